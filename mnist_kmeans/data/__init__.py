"""Data in: IDX files -> chunked Zarr store, and larger training sets made from it."""
