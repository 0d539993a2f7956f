"""Argument checks for the op surface: every backend sees the same errors.

Errors name the op, the argument and the problem. Only metadata is read (shapes, dtypes,
devices), so nothing here synchronises with a device.
"""

from __future__ import annotations

import torch

from .reference import DIAG_TRANSFORMS, event_size_of_packed


def _check_tensor(op: str, name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_one_device(op: str, named: dict[str, torch.Tensor]) -> None:
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in named.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")


def broadcast_batch_shape(op: str, named_batch_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The broadcast of the given batch shapes, or a ValueError naming them."""
    shapes = list(named_batch_shapes.values())
    ndim = max((len(s) for s in shapes), default=0)
    result = []
    for axis in range(-ndim, 0):
        size = 1
        for shape in shapes:
            if -axis > len(shape) or shape[axis] == 1:
                continue
            if size != 1 and shape[axis] != size:
                listed = ", ".join(f"{name} {tuple(s)}" for name, s in named_batch_shapes.items())
                raise ValueError(f"{op}: batch shapes do not broadcast: {listed}")
            size = shape[axis]
        result.append(size)
    return tuple(result)


def broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
    """torch.broadcast_shapes, with the usual case (all shapes equal) answered first:
    torch's version is Python that costs tens of microseconds a call, a share of every
    small-batch log-prob."""
    first = shapes[0]
    if all(shape == first for shape in shapes[1:]):
        return torch.Size(first)
    return torch.broadcast_shapes(*shapes)


def _promote(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _alike(t: object, like: torch.Tensor, event_shape: tuple[int, ...]) -> bool:
    """Whether `t` is a tensor of `like`'s dtype and device shaped (*batch, *event_shape), with
    the batch shape of `like` (*batch, k) or none (a parameter shared by the batch)."""
    if not (isinstance(t, torch.Tensor) and t.dtype == like.dtype and t.device == like.device):
        return False
    n = len(event_shape)
    return t.shape[-n:] == event_shape and (t.dim() == n or t.shape[:-n] == like.shape[:-1])


def _usual_vectors(first: object, *others: object) -> bool:
    """Whether `first` is a floating-point tensor (*, k) and each of `others` is _alike it with
    event (k,): the usual call, which passes every check of the vectors and needs no promotion
    or broadcast. The operand checks answer it first, in a few attribute reads: the general
    checks are Python that cost about 10 us a call, a third of a DiagNormal.log_prob of 8
    samples."""
    if not (isinstance(first, torch.Tensor) and first.is_floating_point() and first.dim() >= 1):
        return False
    event = first.shape[-1:]
    return all(_alike(t, first, event) for t in others)


def mvn_operands(
    op: str,
    value: torch.Tensor,
    loc: torch.Tensor,
    matrix: torch.Tensor,
    matrix_name: str,
    value_name: str = "value",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks a vector (*, k) named `value_name` (value, or eps of a sample), loc (*, k) and a
    matrix (*, k, k), and promotes them to one dtype."""
    if _usual_vectors(value, loc) and _alike(matrix, value, value.shape[-1:] * 2):
        return value, loc, matrix
    named = {value_name: value, "loc": loc, matrix_name: matrix}
    for name, t in named.items():
        _check_tensor(op, name, t)
    _check_one_device(op, named)
    if value.dim() < 1 or loc.dim() < 1:
        raise ValueError(
            f"{op}: {value_name} and loc need an event dimension, got shapes {tuple(value.shape)} "
            f"and {tuple(loc.shape)}"
        )
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(
            f"{op}: {matrix_name} must be a batch of square matrices (*, k, k), "
            f"got shape {tuple(matrix.shape)}"
        )
    k = matrix.shape[-1]
    if value.shape[-1] != k or loc.shape[-1] != k:
        raise ValueError(
            f"{op}: event sizes differ: {value_name} has {value.shape[-1]}, loc has {loc.shape[-1]}, "
            f"{matrix_name} is {k} x {k}"
        )
    broadcast_batch_shape(
        op,
        {value_name: value.shape[:-1], "loc": loc.shape[:-1], matrix_name: matrix.shape[:-2]},
    )
    return _promote(value, loc, matrix)


def square_matrices(op: str, name: str, matrix: torch.Tensor) -> torch.Tensor:
    _check_tensor(op, name, matrix)
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(
            f"{op}: {name} must be a batch of square matrices (*, k, k), got shape {tuple(matrix.shape)}"
        )
    return matrix


def _check_vectors(op: str, named: dict[str, torch.Tensor]) -> None:
    """Floating-point tensors on one device, each with an event dimension."""
    for name, t in named.items():
        _check_tensor(op, name, t)
    _check_one_device(op, named)
    for name, t in named.items():
        if t.dim() < 1:
            raise ValueError(f"{op}: {name} needs an event dimension, got shape {tuple(t.shape)}")


def rows_operands(op: str, named: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Checks tensors of shape (*, k) each (value, loc, scale; or loc, scale, eps) and promotes
    them to one dtype."""
    tensors = tuple(named.values())
    if _usual_vectors(*tensors):
        return tensors
    _check_vectors(op, named)
    sizes = {name: t.shape[-1] for name, t in named.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} has {k}" for name, k in sizes.items())
        raise ValueError(f"{op}: event sizes differ: {listed}")
    broadcast_batch_shape(op, {name: t.shape[:-1] for name, t in named.items()})
    return _promote(*named.values())


def single_operand(op: str, name: str, t: torch.Tensor) -> torch.Tensor:
    _check_tensor(op, name, t)
    return t


def packed_scale_tril(op: str, packed: torch.Tensor, diag_transform: str, min_diag: float) -> int:
    """Checks a packed lower triangle (*, k(k+1)/2) and its diagonal transform; returns k."""
    _check_tensor(op, "packed", packed)
    if packed.dim() < 1:
        raise ValueError(f"{op}: packed needs an event dimension, got shape {tuple(packed.shape)}")
    k = event_size_of_packed(packed.shape[-1])
    if k is None:
        raise ValueError(
            f"{op}: the last dimension of packed must hold k(k+1)/2 values for some k >= 1 "
            f"(1, 3, 6, 10, ...), got {packed.shape[-1]}"
        )
    if diag_transform not in DIAG_TRANSFORMS:
        raise ValueError(f"{op}: diag_transform must be one of {', '.join(DIAG_TRANSFORMS)}, got {diag_transform!r}")
    if not _is_min_diag(min_diag):
        raise ValueError(f"{op}: min_diag must be a finite number >= 0, got {min_diag!r}")
    return k


def _is_min_diag(min_diag: object) -> bool:
    """Whether min_diag is a finite number >= 0."""
    return isinstance(min_diag, (int, float)) and min_diag >= 0 and min_diag != float("inf")


def usual_packed_head(value: object, head: object, diag_transform: object, min_diag: object) -> bool:
    """Whether value (*, k) and a policy head's output (*, k + k(k+1)/2) share one batch shape,
    dtype and device, with a valid diagonal transform: the call the compiled
    packed_head_log_prob takes (it checks the rest itself)."""
    return (
        isinstance(value, torch.Tensor) and isinstance(head, torch.Tensor) and value.is_floating_point()
        and value.dim() >= 1 and value.shape[-1] > 0 and value.shape[:-1] == head.shape[:-1]
        and value.dtype == head.dtype and value.device == head.device
        and diag_transform in DIAG_TRANSFORMS and _is_min_diag(min_diag)
    )


def packed_mvn_operands(
    op: str, value: torch.Tensor, loc: torch.Tensor, packed: torch.Tensor, diag_transform: str, min_diag: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks value (*, k), loc (*, k) and a packed scale_tril (*, k(k+1)/2), and promotes them
    to one dtype."""
    if (
        _usual_vectors(value, loc)
        and value.shape[-1] > 0
        and _alike(packed, value, (value.shape[-1] * (value.shape[-1] + 1) // 2,))
        and diag_transform in DIAG_TRANSFORMS
        and _is_min_diag(min_diag)
    ):
        return value, loc, packed
    named = {"value": value, "loc": loc, "packed": packed}
    _check_vectors(op, named)
    k = packed_scale_tril(op, packed, diag_transform, min_diag)
    if value.shape[-1] != k or loc.shape[-1] != k:
        raise ValueError(
            f"{op}: event sizes differ: value has {value.shape[-1]}, loc has {loc.shape[-1]}, packed holds "
            f"the scale_tril of event size {k} ({packed.shape[-1]} values)"
        )
    broadcast_batch_shape(op, {name: t.shape[:-1] for name, t in named.items()})
    return _promote(value, loc, packed)
