"""Where the packaged real model lives: the product's one lookup (service/common/packaged_model.py), for the
tests."""

from service.common.packaged_model import PackagedModelMissing, packaged_model_path

__all__ = ["PackagedModelMissing", "packaged_model_path"]
