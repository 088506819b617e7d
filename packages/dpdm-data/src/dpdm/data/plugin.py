"""dpdm-data's plugin: registers its datasets through the ``register_datasets`` hook.

Loaded through the ``dpdm`` entry point ``data = "dpdm.data.plugin"``; the dataset modules
are imported inside the hook so that loading the plugin stays cheap.
"""

from __future__ import annotations

from dpdm.core import hookimpl


@hookimpl
def register_datasets(register):
    from .cifar10 import cifar10
    from .digits import digits
    from .image_folder import image_folder, image_zip
    from .mnist import fashion_mnist, mnist
    from .npz import npz
    from .toy import TOY_DATASETS

    for name, factory in TOY_DATASETS.items():
        register(name, factory)
    register("digits", digits)
    register("cifar10", cifar10)
    register("image-zip", image_zip)
    register("image-folder", image_folder)
    register("mnist", mnist)
    register("fashion-mnist", fashion_mnist)
    register("npz", npz)
