"""Activation offload to host memory: per-layer hooks (`layer_hooks`) and any-region offload (`region`),
both on one saved-tensor copier (`copier`, with its host buffers in `host_pool`)."""
from .layer_hooks import LayerOffloadHandle, install_layer_offload, layer_offload_installed
from .region import ActivationOffloader, OffloadedTensor

__all__ = ["install_layer_offload", "LayerOffloadHandle", "layer_offload_installed", "ActivationOffloader",
           "OffloadedTensor"]
