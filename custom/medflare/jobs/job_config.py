"""A job's app config as NVFlare reads and builds it: variables resolved, components built.

Shared by ``medflare job check`` and ``medflare audit`` so both see a job exactly as the FLARE
client or server will.
"""

from __future__ import annotations

from nvflare.fuel.utils.component_builder import ComponentBuilder

__all__ = ["SECTIONS", "ConfigBuilder", "resolve_variables"]

#: the sections of ``config_fed_{client,server}.json`` that hold components (the rest are variables)
SECTIONS = ("components", "workflows", "executors", "task_data_filters", "task_result_filters")


class ConfigBuilder(ComponentBuilder):
    """NVFlare's component builder, without the package scanner (paths are always dotted)."""

    def get_module_scanner(self):
        return None


def resolve_variables(config: dict, path: str) -> dict:
    """``config`` with its ``{variable}`` references resolved in place, as NVFlare resolves them
    (an unknown variable becomes null). Raises what NVFlare raises, e.g. for a cycle."""
    from nvflare.fuel.utils.json_scanner import JsonScanner
    from nvflare.fuel.utils.wfconf import resolve_var_refs

    variables = {k: v for k, v in config.items() if k not in SECTIONS}
    resolve_var_refs(JsonScanner(config, path), variables)
    return config
