"""Which network a job's global models are, and the sample input they take, read from its configs.

The network is the one the server's ``PTFileModelPersistor`` builds, since that persistor
wrote ``FL_global_model.pt``: its ``model`` argument is either the variable ``{model}`` (a
``{"path", "args"}`` dict) or the id of the component ``model``, whose arguments are the
variable ``{model_args}``. A site may build its own side from another form (a MONAI bundle);
the server's plain spec is what the checkpoint fits.

Sample input shapes come from the site executor's arguments, batch size 1:

* ``SegmentationExecutor``: ``image`` ``[1, in_channels, *roi_size]`` (the training crop; the
  network's ``in_channels``, BraTS's 4 modalities);
* ``OutcomeExecutor``: ``image`` ``[1, channels, *image_size]`` when the job has an
  ``image_column`` (``channels``: the image network's ``n_input_channels`` or
  ``in_channels``, else 1: a radiograph), and ``clinical`` ``[1, len(clinical_columns)]``
  when it has clinical columns. The names are ``OutcomeNet.forward``'s arguments.

The values of the sample inputs are standard normal (seeded): the check compares an export
with the network on the same numbers, so they need the input's shape, not its meaning.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["server_model_spec", "sample_input_shapes", "check_input_shapes", "job_export_inputs"]

_PERSISTOR = "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"
_SEGMENTATION = "SegmentationExecutor"
_OUTCOME = "OutcomeExecutor"
_SEGMENTATION_ROI = [48, 48, 48]  # SegmentationExecutor's default roi_size
_OUTCOME_IMAGE_SIZE = [64, 64]  # OutcomeExecutor's default image_size


def server_model_spec(server_config: Mapping[str, Any]) -> dict:
    """The ``{"path", "args"}`` of the network the server's persistor builds.

    Raises:
        ValueError: no ``PTFileModelPersistor``, or its model cannot be resolved.
    """
    components = server_config.get("components", []) if isinstance(server_config, Mapping) else []
    persistors = [c for c in components if isinstance(c, Mapping) and c.get("path") == _PERSISTOR]
    if len(persistors) != 1:
        raise ValueError(f"the server config must have one {_PERSISTOR}, it has {len(persistors)}")
    model = _resolve(server_config, persistors[0].get("args", {}).get("model"))
    if isinstance(model, str):
        component = next((c for c in components if isinstance(c, Mapping) and c.get("id") == model), None)
        if component is None:
            raise ValueError(f"the persistor's model is the component {model!r}, which the server config does not have")
        model = {"path": component.get("path"), "args": _resolve(server_config, component.get("args", {}))}
    if not isinstance(model, Mapping) or not isinstance(model.get("path"), str) or not isinstance(model.get("args", {}), Mapping):
        raise ValueError(f"the persistor's model must be {{'path', 'args'}}, got {model!r}")
    return {"path": model["path"], "args": dict(model.get("args", {}))}


def _resolve(config: Mapping, value):
    """A whole-string ``"{name}"`` is the config's variable ``name``."""
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        name = value[1:-1]
        if name not in config:
            raise ValueError(f"the server config refers to the variable {value!r}, which it does not define")
        return config[name]
    return value


def sample_input_shapes(executor: Mapping[str, Any], model_spec: Mapping[str, Any]) -> dict:
    """``{input name: shape}`` of the network ``model_spec``, from the site ``executor``'s
    ``{"path", "args"}`` (see the module docstring).

    Raises:
        ValueError: an executor medflare does not know the inputs of, or arguments that do not
            give them.
    """
    path = str(executor.get("path", "")) if isinstance(executor, Mapping) else ""
    args = executor.get("args", {}) if isinstance(executor, Mapping) else {}
    model_args = model_spec.get("args", {}) if isinstance(model_spec, Mapping) else {}
    if path.endswith(_SEGMENTATION):
        roi = list(args.get("roi_size", _SEGMENTATION_ROI))
        channels = model_args.get("in_channels")
        return check_input_shapes({"image": [1, channels, *roi]}, f"{path}'s roi_size and the network's in_channels")
    if path.endswith(_OUTCOME):
        shapes = {}
        if args.get("image_column"):
            image_args = (model_args.get("image_network") or {}).get("args", {})
            channels = image_args.get("n_input_channels", image_args.get("in_channels", 1))
            shapes["image"] = [1, channels, *list(args.get("image_size", _OUTCOME_IMAGE_SIZE))]
        columns = args.get("clinical_columns") or []
        if columns:
            shapes["clinical"] = [1, len(columns)]
        return check_input_shapes(shapes, f"{path}'s image_size and clinical_columns")
    raise ValueError(
        f"the sample input of a model trained by {path!r} is not known: medflare derives it for its "
        f"{_SEGMENTATION} and {_OUTCOME}"
    )


def check_input_shapes(shapes, name: str = "inputs") -> dict:
    """``shapes`` if it maps input names (identifiers) to shapes of ints >= 1 with a batch axis.

    Raises:
        ValueError: naming ``name`` and the bad value.
    """
    if not isinstance(shapes, Mapping) or not shapes:
        raise ValueError(f"{name} must be a non-empty {{input name: shape}}, got {shapes!r}")
    for key, shape in shapes.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{name}: input names must be identifiers, got {key!r}")
        if (
            not isinstance(shape, (list, tuple))
            or len(shape) < 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
        ):
            raise ValueError(f"{name}[{key!r}] must be a shape of ints >= 1, batch first, got {shape!r}")
    batches = sorted({shape[0] for shape in shapes.values()})
    if len(batches) != 1:
        raise ValueError(f"{name}: every input must have the same batch size (dim 0), got {batches}")
    return {key: list(shape) for key, shape in shapes.items()}


def job_export_inputs(server_config: Mapping, client_config: Mapping) -> tuple[dict, dict]:
    """``(model spec, sample input shapes)`` of a job: the server's network, the first
    executor's inputs."""
    spec = server_model_spec(server_config)
    try:
        executor = client_config["executors"][0]["executor"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("the client config has no executor to read the sample input from") from None
    return spec, sample_input_shapes(executor, spec)
