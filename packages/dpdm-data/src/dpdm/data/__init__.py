"""dpdm.data: datasets for dpdm, registered under kind ``"dataset"`` by ``dpdm.data.plugin``.

- ``dpdm.data.toy``: 2-D toy distributions (``gaussian-ring``, ``gaussian-grid``, ``checkerboard``,
  ``two-moons``, ``swiss-roll``) and ``gaussian`` in N-D, each with ``sample(n, generator)``;
- ``dpdm.data.digits``: scikit-learn's 8 × 8 digits (``digits``);
- ``dpdm.data.cifar10``: CIFAR-10 from the official python archive (``cifar10``);
- ``dpdm.data.image_folder``: EDM's dataset ZIPs and folders of PNGs (``image-zip``, ``image-folder``).

Importing this package is cheap: torch and scikit-learn load with the submodules. Look
datasets up through the registry::

    from dpdm.core import get
    train = get("dataset", "gaussian-ring")(split="train", num_samples=10000)
"""
