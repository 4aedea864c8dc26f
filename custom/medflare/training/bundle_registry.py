"""Which MONAI bundles a site allows: the site's bundle registry, a job's request, the checksum.

A MONAI bundle's config can evaluate Python (``"$..."`` expressions) and instantiate any class
(``"_target_"``), so parsing a bundle config runs its author's code. A job therefore never
carries a bundle, nor points at one: it only **names** one (``{"bundle": "brats_mri_segmentation",
"version": "0.5.3"}``), and the site looks the name up in its own registry, a JSON file the site
admin writes::

    {"bundles": {"brats_mri_segmentation": {
        "path": "/opt/monai_bundles/brats_mri_segmentation",
        "version": "0.5.3",
        "sha256": "<bundle_digest of the installed folder>",
        "config": "configs/inference.json",      (optional, this default)
        "weights": "models/model.pt"}}}          (optional, this default)

A relative ``path`` is relative to the registry file's folder. The registry is found like the
site's data configuration (:mod:`medflare.data.site_data_config`): the environment variable
``MEDFLARE_BUNDLES`` of the client process (``{site_name}`` is replaced by the site's name, so
one variable serves several simulated sites), else ``<site workspace>/local/medflare_bundles.json``.

Before any byte of a bundle is parsed, :func:`read_site_bundle` checks, failing closed with a
:class:`BundleError` that names the bundle, the registry file and what differs: the name is
allow-listed; the folder exists; ``configs/metadata.json`` is readable and its ``version`` is the
registry's (and the job's, when the job names one); and the folder's :func:`bundle_digest`
equals the registry's ``sha256``, so a bundle edited or swapped on disk after the admin allowed
it is refused. The files that are then used (config, metadata, weights) are the very bytes that
were hashed: nothing is read twice from disk.

The digest (Notes) covers every file under ``configs/``, ``models/`` and ``scripts/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from medflare.data.data_errors import DataListError

__all__ = [
    "BUNDLE_REQUEST_KEYS",
    "BundleError",
    "BundleRequest",
    "ENV_VAR",
    "HASHED_FOLDERS",
    "LOCAL_FILE_NAME",
    "SiteBundle",
    "bundle_digest",
    "find_bundle_registry",
    "parse_bundle_request",
    "read_bundle_registry",
    "read_site_bundle",
]

ENV_VAR = "MEDFLARE_BUNDLES"
LOCAL_FILE_NAME = "medflare_bundles.json"
BUNDLES_KEY = "bundles"
#: the folders of a bundle whose every file the digest covers
HASHED_FOLDERS = ("configs", "models", "scripts")
METADATA = "configs/metadata.json"
DEFAULT_CONFIG = "configs/inference.json"
DEFAULT_WEIGHTS = "models/model.pt"
#: the keys of a job's bundle request (see :func:`parse_bundle_request`)
BUNDLE_REQUEST_KEYS = ("bundle", "version", "network_key", "use_preprocessing", "load_weights")

_ENTRY_KEYS = ("path", "version", "sha256", "config", "weights")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]*")
_CONFIG_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:(?:#|::)[A-Za-z0-9_]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(DataListError):
    """A bundle the site cannot use: not allow-listed, missing, changed, or malformed."""


@dataclass(frozen=True)
class BundleRequest:
    """What a job may say about a bundle: its name and nothing that locates it.

    Attributes:
        name: the bundle's name in the site's registry.
        version: the version the job expects, or None for the one the site installed.
        network_key: the config id of the network (MONAI's convention: ``network_def``).
        use_preprocessing: validate with the bundle's own ``preprocessing`` chain.
        load_weights: start the site's network from the bundle's weights file.
    """

    name: str
    version: Optional[str] = None
    network_key: str = "network_def"
    use_preprocessing: bool = False
    load_weights: bool = False


@dataclass(frozen=True)
class SiteBundle:
    """An allow-listed bundle, checked against its registry entry.

    ``config``, ``metadata`` and ``weights`` are the parsed config and metadata and the raw
    weights bytes (None when the bundle has no weights file) read while the digest was taken.
    """

    name: str
    folder: str
    version: str
    registry: str
    config_file: str
    config: dict
    metadata: dict
    weights_file: str
    weights: Optional[bytes]


def _name_rule(what: str, value) -> str:
    return f"{what} must be a non-empty string of letters, digits, '_', '-' and '.', starting with a letter or digit, got {value!r}"


def parse_bundle_request(request: Mapping, what: str = "model") -> BundleRequest:
    """The :class:`BundleRequest` of a job's ``{"bundle": name[, "version", "network_key",
    "use_preprocessing", "load_weights"]}``.

    Raises:
        ValueError: a key other than those (in particular anything naming a path or carrying
            a config: a job names a bundle, it never supplies or locates one), a bad name,
            version or config id, or a flag that is not a bool.
    """
    if not isinstance(request, Mapping):
        raise ValueError(f"{what} must be a JSON object naming a site bundle, got {request!r}")
    unknown = sorted(set(request) - set(BUNDLE_REQUEST_KEYS))
    if unknown:
        raise ValueError(
            f"{what}: unknown key(s) {unknown} in a bundle request; allowed: {list(BUNDLE_REQUEST_KEYS)}. "
            "A job only names a bundle the site installed; it never carries a bundle, its config or a path to one"
        )
    name = request.get("bundle")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(_name_rule(f"{what}['bundle'] (the bundle's name in the site's registry)", name))
    version = request.get("version")
    if version is not None and (not isinstance(version, str) or not _VERSION.fullmatch(version)):
        raise ValueError(f"{what}['version'] must be null or a version string such as '0.5.3', got {version!r}")
    network_key = request.get("network_key", "network_def")
    if not isinstance(network_key, str) or not _CONFIG_ID.fullmatch(network_key):
        raise ValueError(f"{what}['network_key'] must be a config id such as 'network_def', got {network_key!r}")
    flags = {}
    for key in ("use_preprocessing", "load_weights"):
        value = request.get(key, False)
        if not isinstance(value, bool):
            raise TypeError(f"{what}[{key!r}] must be true or false, got {value!r}")
        flags[key] = value
    return BundleRequest(name, version, network_key, **flags)


def _relative_inside(value, key: str, name: str, path: str) -> str:
    """``value`` as a normalised relative path that stays inside the bundle folder."""
    if not isinstance(value, str) or not value:
        raise BundleError(f"bundle registry {path}: bundles.{name}.{key} must be a non-empty relative path, got {value!r}")
    norm = os.path.normpath(value).replace(os.sep, "/")
    if os.path.isabs(value) or norm == ".." or norm.startswith("../"):
        raise BundleError(f"bundle registry {path}: bundles.{name}.{key} {value!r} leaves the bundle folder; give a path inside it")
    return norm


def read_bundle_registry(path: str) -> dict[str, dict]:
    """``{name: {"path" (absolute), "version", "sha256", "config", "weights"}}`` of a registry file.

    Raises:
        BundleError: naming ``path`` (and the key) when the file is missing or not JSON, holds
            anything but ``bundles``, or an entry lacks or mistypes a field.
    """
    from medflare.data.brats_layout import read_json_object

    try:
        content = read_json_object(path, "bundle registry")
    except DataListError as e:
        raise BundleError(str(e)) from None
    unknown = sorted(set(content) - {BUNDLES_KEY})
    bundles = content.get(BUNDLES_KEY)
    if unknown or not isinstance(bundles, dict):
        raise BundleError(
            f"bundle registry {path} must be {{{BUNDLES_KEY!r}: {{name: {{path, version, sha256}}}}}}, "
            f"got keys {sorted(content)}"
        )
    base = os.path.dirname(os.path.abspath(path))
    registry = {}
    for name, entry in bundles.items():
        if not _NAME.fullmatch(name):
            raise BundleError(f"bundle registry {path}: " + _name_rule("a bundle name", name))
        if not isinstance(entry, dict):
            raise BundleError(f"bundle registry {path}: bundles.{name} must be an object {{path, version, sha256}}, got {entry!r}")
        extra = sorted(set(entry) - set(_ENTRY_KEYS))
        if extra:
            raise BundleError(f"bundle registry {path}: bundles.{name} has unknown key(s) {extra}; allowed: {list(_ENTRY_KEYS)}")
        for key in ("path", "version", "sha256"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise BundleError(f"bundle registry {path}: bundles.{name} needs a non-empty string {key!r}, got {entry.get(key)!r}")
        if not _SHA256.fullmatch(entry["sha256"]):
            raise BundleError(
                f"bundle registry {path}: bundles.{name}.sha256 must be 64 lowercase hex digits (bundle_digest), got {entry['sha256']!r}"
            )
        registry[name] = {
            "path": os.path.normpath(os.path.join(base, os.path.expanduser(entry["path"]))),
            "version": entry["version"],
            "sha256": entry["sha256"],
            "config": _relative_inside(entry.get("config", DEFAULT_CONFIG), "config", name, path),
            "weights": _relative_inside(entry.get("weights", DEFAULT_WEIGHTS), "weights", name, path),
        }
    return registry


def find_bundle_registry(site_name: str, local_dir: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """The registry file of ``site_name``: ``MEDFLARE_BUNDLES`` (with ``{site_name}``), else
    ``<local_dir>/medflare_bundles.json``.

    Raises:
        BundleError: naming every place looked at when the site has no registry.
    """
    environ = os.environ if environ is None else environ
    template = environ.get(ENV_VAR)
    if template:
        return template.replace("{site_name}", site_name)
    looked = [f"environment variable {ENV_VAR} (unset)"]
    if local_dir:
        path = os.path.join(local_dir, LOCAL_FILE_NAME)
        if os.path.isfile(path):
            return path
        looked.append(f"{path} (absent)")
    raise BundleError(
        f"site {site_name!r} allows no MONAI bundle: it has no bundle registry; looked at " + ", ".join(looked)
        + f". A site admin lists the bundles the site allows in local/{LOCAL_FILE_NAME}"
    )


def _bundle_files(folder: str, name: str, registry: str) -> list[str]:
    """Relative paths (``/``-separated, sorted) of the files the digest covers; symbolic links refused."""
    files = []
    for top in HASHED_FOLDERS:
        root = os.path.join(folder, top)
        if os.path.islink(root):
            raise BundleError(f"bundle {name!r} ({registry}): {root} is a symbolic link; a site bundle is plain files")
        for current, dirs, names in os.walk(root):
            for entry in dirs + names:
                full = os.path.join(current, entry)
                if os.path.islink(full):
                    raise BundleError(f"bundle {name!r} ({registry}): {full} is a symbolic link; a site bundle is plain files")
            dirs.sort()
            files += [os.path.relpath(os.path.join(current, n), folder).replace(os.sep, "/") for n in names]
    return sorted(files)


def _digest_and_keep(folder: str, keep: set, name: str = "?", registry: str = "?") -> tuple[str, dict]:
    outer = hashlib.sha256()
    kept = {}
    for rel in _bundle_files(folder, name, registry):
        inner = hashlib.sha256()
        chunks = [] if rel in keep else None
        with open(os.path.join(folder, rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                inner.update(chunk)
                if chunks is not None:
                    chunks.append(chunk)
        if chunks is not None:
            kept[rel] = b"".join(chunks)
        outer.update(f"{rel}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest(), kept


def bundle_digest(folder: str) -> str:
    """The SHA-256 a registry entry holds for the bundle in ``folder``.

    Notes:
        :math:`H = \\mathrm{sha256}(\\Vert_f\\; p_f \\,\\|\\, \\mathtt{0x00} \\,\\|\\, \\mathrm{hex}(\\mathrm{sha256}(f)) \\,\\|\\, \\mathtt{\\n})`
        over every file :math:`f` under ``configs/``, ``models/`` and ``scripts/`` in order of its
        ``/``-separated relative path :math:`p_f`. A file added, removed, renamed or edited there
        changes it; files elsewhere in the folder (docs, licences) do not. Symbolic links are refused.

    Raises:
        BundleError: ``folder`` is not a folder, or holds a symbolic link.
    """
    if not os.path.isdir(folder):
        raise BundleError(f"bundle folder not found: {folder}")
    return _digest_and_keep(folder, set(), os.path.basename(folder), folder)[0]


def _parse_config(data: bytes, rel: str, name: str, registry: str) -> dict:
    try:
        if rel.endswith((".yaml", ".yml")):
            import yaml

            content = yaml.safe_load(data.decode("utf-8"))
        else:
            content = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {name!r} ({registry}): {rel} is not readable: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise BundleError(f"bundle {name!r} ({registry}): {rel} is not readable: {type(e).__name__}: {e}") from None
    if not isinstance(content, dict):
        raise BundleError(f"bundle {name!r} ({registry}): {rel} must hold an object, got {type(content).__name__}")
    return content


def read_site_bundle(
    request: BundleRequest, site_name: str, local_dir: Optional[str], environ: Optional[Mapping[str, str]] = None
) -> SiteBundle:
    """The allow-listed bundle ``request`` names at this site, checked (see the module docstring).

    Raises:
        BundleError: no registry; the name is not allow-listed (the allowed names are listed);
            the folder, metadata, config or (with ``load_weights``) weights file is missing or
            unreadable; a version differs (metadata, registry, job); the digest differs.
    """
    registry_path = os.path.abspath(find_bundle_registry(site_name, local_dir, environ))
    registry = read_bundle_registry(registry_path)
    name = request.name
    if name not in registry:
        raise BundleError(
            f"bundle {name!r} is not allow-listed at site {site_name!r}: bundle registry {registry_path} allows "
            f"{sorted(registry) or 'none'}. Nothing of it was read"
        )
    entry = registry[name]
    where = f"bundle {name!r} (bundle registry {registry_path})"
    folder = entry["path"]
    if not os.path.isdir(folder):
        raise BundleError(f"{where}: its folder {folder} does not exist")
    if request.version is not None and request.version != entry["version"]:
        raise BundleError(f"{where}: the job asks for version {request.version!r}, this site allows {entry['version']!r}")
    keep = {METADATA, entry["config"], entry["weights"]}
    digest, kept = _digest_and_keep(folder, keep, name, registry_path)
    if METADATA not in kept:
        raise BundleError(f"{where}: {os.path.join(folder, METADATA)} not found")
    metadata = _parse_config(kept[METADATA], METADATA, name, registry_path)
    version = metadata.get("version")
    if version != entry["version"]:
        raise BundleError(
            f"{where}: {os.path.join(folder, METADATA)} says version {version!r}, the registry allows {entry['version']!r}"
        )
    if digest != entry["sha256"]:
        raise BundleError(
            f"{where}: the files under {folder}/{{{','.join(HASHED_FOLDERS)}}} have sha256 {digest}, the registry "
            f"allows {entry['sha256']}: the bundle changed on disk since the site allowed it. Nothing of it was parsed; "
            "re-install it or update the registry after checking the change"
        )
    if entry["config"] not in kept:
        raise BundleError(f"{where}: config file {os.path.join(folder, entry['config'])} not found (it must lie under configs/)")
    config = _parse_config(kept[entry["config"]], entry["config"], name, registry_path)
    weights = kept.get(entry["weights"])
    if request.load_weights and weights is None:
        raise BundleError(f"{where}: the job asks for its weights and {os.path.join(folder, entry['weights'])} does not exist")
    return SiteBundle(
        name, folder, entry["version"], registry_path, entry["config"], config, metadata, entry["weights"], weights
    )
