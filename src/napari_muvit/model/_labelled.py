"""What segmenters and point detectors share: K classes with names, output values and colours,
the normalisation they were trained with, and the ``config.yaml`` fields that hold them."""

from __future__ import annotations

from typing import Any

from torch import nn

from napari_muvit.errors import InputError


def class_fields(
    num_classes: int,
    class_names: list[str] | None,
    label_values: list[int] | None,
    class_colors: list | None,
    *,
    first_value: int,
    names_from_values: bool,
) -> tuple[list[str], list[int], list | None]:
    """Checked ``(class_names, label_values, class_colors)`` of K classes. Defaults: values
    ``first_value ..``, names ``"class <value>"`` (``names_from_values``) or ``"class <index>"``."""
    K = int(num_classes)
    values = (list(range(first_value, first_value + K)) if label_values is None
              else [int(v) for v in label_values])
    if class_names is not None:
        names = list(class_names)
    else:
        names = [f"class {v}" for v in (values if names_from_values else range(K))]
    for name, val in (("class_names", names), ("label_values", values)):
        if len(val) != K:
            raise InputError(f"{name}: expected {K} entries (num_classes), got {len(val)}")
    if class_colors is not None and len(class_colors) != K:
        raise InputError(f"class_colors: expected {K} entries, got {len(class_colors)}")
    return names, values, None if class_colors is None else list(class_colors)


def normalization_dict(normalization: Any) -> dict | None:
    """A normalisation as its dict (``None`` stays ``None``)."""
    if normalization is None or isinstance(normalization, dict):
        return normalization
    to_dict = getattr(normalization, "to_dict", None)
    if to_dict is None:
        raise InputError(
            f"normalization: expected a dict or Normalization, got {type(normalization).__name__}"
        )
    return to_dict()


def labelled_config(model: nn.Module, kind: str) -> dict[str, Any]:
    """Everything of ``config.yaml`` but format fields and meta (used by ``save_model``)."""
    return {
        "kind": kind,
        "encoder": model.encoder.config,
        "head": model.head_config,
        "class_names": model.class_names,
        "label_values": model.label_values,
        "class_colors": model.class_colors,
        "normalization": model.normalization,
    }


def labelled_kwargs(cfg: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of :func:`labelled_config`'s class fields."""
    return {
        "class_names": cfg.get("class_names"),
        "label_values": cfg.get("label_values"),
        "normalization": cfg.get("normalization"),
        "meta": meta,
        "class_colors": cfg.get("class_colors"),
    }
