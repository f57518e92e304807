"""``python -m mnist_kmeans``: the same as the ``mnist-kmeans`` console script."""

from mnist_kmeans.cli import main

raise SystemExit(main())
