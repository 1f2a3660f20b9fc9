"""A simulated accelerator for CPU tests (see ``tests/workflows/test_device.py``): host data must be moved before it
reaches the model, model outputs must be moved back before metrics or patches. Shared by the device tests of the
workflows and of ``slug compare``."""

from __future__ import annotations

import torch

from slugkit.models.base import Stage


def _moves(func, args, kwargs) -> bool:
    """Whether ``func(*args, **kwargs)`` is a device move (``.to(device)``, ``.to(other)``, ``.cuda()``, ``.cpu()``)."""
    if func in (torch.Tensor.cuda, torch.Tensor.cpu):
        return True
    if func is torch.Tensor.to:
        return "device" in (kwargs or {}) or any(isinstance(x, (str, torch.device, torch.Tensor)) for x in args[1:])
    return False


class _Placed(torch.Tensor):
    """A CPU tensor tagged with where it stands to live; a device move returns a plain tensor (the other side)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if _moves(func, args, kwargs):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {})).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)


class HostTensor(_Placed):
    """Data in host memory: must be moved before it reaches the model."""


class DeviceTensor(_Placed):
    """Model output in device memory: must be moved to the CPU before metrics / patches."""


def host(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(HostTensor)


def _on_device(*ts):
    for t in ts:
        if isinstance(t, HostTensor):
            raise RuntimeError("Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor) should be "
                               "the same (simulated: a host tensor reached the model without .to(adapter.device))")


def _plain(t):
    return None if t is None else t.as_subclass(torch.Tensor)


class SimDeviceAdapter:
    """A real adapter whose model stands on a separate device: host inputs are refused, outputs are device tensors;
    data it produces (``preprocess``, ``tokenize``) is host data."""

    def __init__(self, inner):
        self.inner = inner
        self._stages = {}

    def __getattr__(self, name):  # model, model_id, family, candidate_names, group_of, tower_of, stage_index, ...
        return getattr(self.inner, name)

    @property
    def device(self):
        return self.inner.device

    def preprocess(self, image):
        return host(self.inner.preprocess(image))

    def tokenize(self, texts):
        return host(self.inner.tokenize(texts))

    def encode_image(self, images):
        _on_device(images)
        return self.inner.encode_image(_plain(images)).as_subclass(DeviceTensor)

    def encode_text(self, tokens):
        _on_device(tokens)
        return self.inner.encode_text(_plain(tokens)).as_subclass(DeviceTensor)

    def forget_loss_per_sample(self, images, tokens):
        _on_device(images, tokens)
        return self.inner.forget_loss_per_sample(_plain(images), _plain(tokens))

    def retain_loss(self, images, tokens):
        _on_device(images, tokens)
        return self.inner.retain_loss(_plain(images), _plain(tokens))

    def stages(self, tower):
        if tower not in self._stages:
            def wrap(fn):
                def checked(x, ctx):
                    _on_device(x, ctx)
                    return fn(_plain(x), _plain(ctx)).as_subclass(DeviceTensor)
                return checked

            self._stages[tower] = [Stage(s.name, wrap(s.fn), s.params) for s in self.inner.stages(tower)]
        return self._stages[tower]
