"""headzoo: segmentation heads for thousands of classes, side by side on one nnU-Net backbone."""

from headzoo.paths import configure_nnunet_environment

configure_nnunet_environment()  # before anything imports nnunetv2

from headzoo.errors import HeadzooError  # noqa: E402
from headzoo.head import Head  # noqa: E402
from headzoo.registry import create_head, list_heads  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Head", "HeadzooError", "create_head", "list_heads", "__version__"]
