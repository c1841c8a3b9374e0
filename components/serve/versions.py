"""Which fine-tuned version a request's `model` names, and that version's files on local disk.

Public model ids:

``NAME`` (``registry.model_name``) or ``NAME@ALIAS``
    the version holding the alias now (``@champion`` unless ``serve.model`` says otherwise). The alias is
    resolved again every ``serve.alias_refresh_s``: traffic follows `pipelines/promote.py`.
``NAME/VERSION``
    that registered version, loaded on first use.

``serve.model`` (or ``--model``) may also be a stage-2 artifact URI: then ``NAME`` serves that artifact
and no registry is asked. A registry version is the pyfunc package `components.packaging` logged
(config, stage-2 artifact, base or a reference to it), downloaded once per replica.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from components import storage
from components.config import DuetConfig, StorageSection
from components.model.artifact import read_artifact_meta
from components.packaging import package_config
from components.serve.protocol import APIError

_REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a registry alias, a registry version, or a stage-2 artifact URI."""

    name: str
    alias: str | None = None
    version: str | None = None
    artifact: str | None = None

    @property
    def key(self) -> str:
        """What a loaded version is cached under: ``NAME/VERSION`` or the artifact URI."""
        if self.artifact:
            return self.artifact
        if self.version is None:
            raise ValueError(f"{self} names an alias: resolve it to a version first")
        return f"{self.name}/{self.version}"


def parse_default(uri: str, name: str, storage_cfg: StorageSection | None = None) -> ModelRef:
    """`serve.model` / `--model`: models:/NAME@ALIAS, models:/NAME/VERSION or a stage-2 artifact URI."""
    if uri.startswith("models:/"):
        found = _REGISTRY_URI.fullmatch(uri)
        if not found:
            raise ValueError(f"serve.model {uri!r}: a registry URI is models:/NAME@ALIAS or models:/NAME/VERSION")
        return ModelRef(found["name"], found["alias"], found["version"])
    meta = read_artifact_meta(uri, storage_cfg)
    if meta.stage != 2:
        raise ValueError(f"serve.model {uri!r} is a stage-{meta.stage} artifact: serve a stage-2 (fine-tuned) one")
    return ModelRef(name, artifact=uri)


def parse_request_model(model: str, served: ModelRef) -> ModelRef:
    """A request's `model` field, against what the server serves by default."""
    name, _, rest = model.partition("@")
    if rest:
        if name != served.name or served.artifact:
            raise _unknown(model, served)
        return ModelRef(name, alias=rest)
    name, _, version = model.partition("/")
    if name != served.name:
        raise _unknown(model, served)
    if not version:
        return served
    if served.artifact or not version.isdigit():
        raise _unknown(model, served)
    return ModelRef(name, version=version)


def _unknown(model: str, served: ModelRef) -> APIError:
    also = "" if served.artifact else f", {served.name}@ALIAS or {served.name}/VERSION"
    return APIError(404, f"model {model[:100]!r} is not served here: ask for {served.name!r}{also} "
                         "(GET /v1/models lists them)", param="model", kind="not_found_error")


@dataclass(frozen=True)
class Package:
    """One version on local disk: the config it was trained with (base checkpoint set) and its stage-2 folder."""

    key: str
    cfg: DuetConfig
    stage2: str
    folder: Path | None = None  # a downloaded copy, removed by `discard`

    def discard(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class Catalog:
    """Resolves aliases and fetches versions from the MLflow registry (or serves one artifact URI)."""

    def __init__(self, cfg: DuetConfig, served: ModelRef) -> None:
        self.cfg = cfg
        self.served = served
        self._tracker = None

    @property
    def tracker(self):  # built on first use: serving an artifact URI never talks to MLflow
        if self._tracker is None:
            from components.tracking.tracker import Tracker

            self._tracker = Tracker(self.cfg.tracking, self.cfg.run.work_dir)
        return self._tracker

    @property
    def client(self):
        return self.tracker.client

    def resolve(self, ref: ModelRef) -> ModelRef:
        """An alias reference made concrete (the version holding it now); others unchanged."""
        if ref.alias is None:
            return ref
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(ref.name, ref.alias)
        except MlflowException as exc:
            raise APIError(404, f"{ref.name}@{ref.alias} resolves to no version in the registry "
                                f"({exc.error_code}): promote one with pipelines/promote.py",
                           param="model", kind="not_found_error") from None
        return ModelRef(ref.name, version=str(version.version))

    def check(self, ref: ModelRef) -> None:
        """A registry version that does not exist is a 404 naming it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version(ref.name, ref.version)
        except MlflowException:
            raise APIError(404, f"model {ref.name!r} has no version {ref.version} in the registry",
                           param="model", kind="not_found_error") from None

    def fetch(self, ref: ModelRef) -> Package:
        """The version's files, downloaded from the registry to a folder of this process."""
        if ref.artifact:
            return Package(ref.key, self.cfg, ref.artifact)
        import mlflow.artifacts

        self.check(ref)
        root = storage.cache_root() / "serve"
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{ref.name}-{ref.version}-", dir=root))
        try:
            with self.tracker.as_default():  # models:/ URIs are looked up in the default registry
                local = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{ref.name}/{ref.version}", dst_path=str(folder)))
            artifacts = _package_artifacts(local)
            cfg = package_config(artifacts["config"], artifacts["base"])
            return Package(ref.key, cfg, str(artifacts["stage2"]), folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise


def _package_artifacts(model_dir: Path) -> dict[str, Path]:
    """config / stage2 / base of a downloaded duet pyfunc, from its MLmodel file."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise ValueError(f"{model_dir} has no MLmodel: the registered version is not a logged duet model")
    flavor = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    missing = [k for k in ("config", "stage2", "base") if k not in artifacts]
    if missing:
        raise ValueError(f"{mlmodel}: the model's artifacts lack {missing}; register a model logged by duet "
                         "(components/packaging.py)")
    return {k: model_dir / artifacts[k]["path"] for k in ("config", "stage2", "base")}
