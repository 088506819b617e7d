"""dpdm.data: datasets for dpdm, registered under kind ``"dataset"`` by ``dpdm.data.plugin``, and the
``dpdm data`` commands' work.

Datasets:

- ``dpdm.data.toy``: 2-D toy distributions (``gaussian-ring``, ``gaussian-grid``, ``checkerboard``,
  ``two-moons``, ``swiss-roll``) and ``gaussian`` in N-D, each with ``sample(n, generator)``;
- ``dpdm.data.digits``: scikit-learn's 8 × 8 digits (``digits``);
- ``dpdm.data.cifar10``: CIFAR-10 from the official python archive (``cifar10``);
- ``dpdm.data.mnist``: MNIST and Fashion-MNIST from the official IDX files (``mnist``, ``fashion-mnist``);
- ``dpdm.data.npz``: uint8 images and labels from a ``.npz`` file (``npz``);
- ``dpdm.data.image_folder``: EDM's dataset ZIPs and folders of PNGs (``image-zip``, ``image-folder``).

Download: ``dpdm.data.download`` fetches the official CIFAR-10 / MNIST / Fashion-MNIST files and checks
their md5 (``dpdm data download``).

Prepare (``dpdm data prepare``, EDM's ``dataset_tool.py``):

- ``dpdm.data.prepare``: the pipeline, the worker pool, the atomic deterministic ZIP writer and the report;
- ``dpdm.data.sources``: reading the inputs (folders, zips, CIFAR-10, MNIST, npz) and detecting their kind;
- ``dpdm.data.transforms``: per image, decode, L/RGB, EDM's and ADM's center crops and resizes, PNG encode.

Info: ``dpdm.data.info`` describes any dataset and draws a grid of samples (``dpdm data info``).

Loader: ``dpdm.data.loader`` streams batches and resumes at the exact next batch.

Storage: ``dpdm.data.storage`` locates a ``data.path`` on any fsspec storage, with one clear error.

Importing this package is cheap: torch and scikit-learn load with the submodules. Look
datasets up through the registry::

    from dpdm.core import get
    train = get("dataset", "gaussian-ring")(split="train", num_samples=10000)
"""
