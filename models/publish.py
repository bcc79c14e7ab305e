"""Publishing an ONNX model into the Triton model repository, and the live version switch.

Layout written under ``settings.triton.model_repository`` for a base name (``ctr_deep``):

```
ctr_deep/config.pbtxt         platform "onnxruntime_onnx", KIND_GPU, dynamic batching
ctr_deep/<v>/model.onnx       (+ card.json)
ctr_deep_py/config.pbtxt      backend "python", KIND_CPU, dynamic batching
ctr_deep_py/<v>/model.onnx    the same file
ctr_deep_py/<v>/model.py      models/triton_model.py (ONNX Runtime inside the Python backend)
```

Both flavours get the same new version number (one above the highest of either).
``served_model_name(settings, base)`` is the flavour this deployment loads:
``settings.triton.backend`` "onnxruntime" -> ``<base>`` (NVIDIA's container), "python" ->
``<base>_py`` (the local stack, whose tritonserver ships only the Python backend).

The switch (Triton in explicit model-control mode), for the served flavour:

1. config.pbtxt with ``version_policy: { specific: { versions: [old..., new] } }``, load:
   the old versions keep serving while ``new`` loads; from the moment it is ready, requests
   that do not pin a version go to the highest ready version, ``new``;
2. verify: ``new`` (pinned) answers probe inputs with the scores of in-process ONNX Runtime
   on the same file (max abs diff <= 1e-5); on failure the old config is restored and
   reloaded, the new version's files are removed, and ``PublishError`` is raised;
3. config with ``versions: [new, pinned...]``, load again: the old versions are unloaded,
   except the **pinned** ones.

Pins keep versions served side by side (an experiment's arms each ask their own version):
``pin_versions(settings, base, versions, owner)`` records, in the served record, that
``owner`` (an experiment name) needs those versions of ``base``, and loads them if they are
not loaded; every later publish keeps them loaded; ``unpin(settings, owner)`` drops the
owner's pins, and the next publish unloads the versions nobody pins any more. Pinned
version directories are never pruned.

No request fails during the switch: Triton keeps a loaded version serving until its
replacement is ready, and it unloads a version only after its in-flight requests finish.

**Several Triton servers** (``settings.triton.grpc_urls``; docs/triton-replicas.md): they
share the model repository, and each step above runs on every server before the next step
starts - the new version is loaded and verified on all of them (1-2) before the old ones
are unloaded anywhere (3). The clients ask the newest version that is ready on every server
(``serving/triton_client.py``), so no request goes to the new version before step 2 has
finished everywhere, and none is answered by an old one once the switch has returned. A
server that cannot be reached refuses the publish (nothing is changed), as with one server.

Model control needs the control key (``ctrstream.config.triton_control_key``): the publisher
is its one holder and sends it with every load and unload. After a switch the publisher
records the served versions in ``settings.triton.served_record``; whatever starts Triton
loads the models listed there, so a restarted Triton serves them again by itself - the pinned
versions with the newest, since the config's ``version_policy`` lists them all. The record::

    {"models": {"ctr_lr_py": {"base_name": "ctr_lr", "versions": [1, 3], ...}},
     "pins": {"ctr_lr_py": {"exp-demo": [1]}}}
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ctrstream import features
from ctrstream.config import Settings, triton_control_headers, triton_control_key

# the Python-backend model that runs an ONNX file inside Triton (copied as model.py)
TRITON_MODEL_PY = Path(__file__).resolve().with_name("triton_model.py")
PY_SUFFIX = "_py"
VERIFY_ATOL = 1e-5


class PublishError(RuntimeError):
    pass


def served_model_name(settings: Settings, base: str) -> str:
    """The Triton model name this deployment serves for ``base`` (see module doc)."""
    return base if settings.triton.backend == "onnxruntime" else base + PY_SUFFIX


def base_model_name(name: str) -> str:
    """The base name of a Triton model name of either flavour (``ctr_lr_py`` -> ``ctr_lr``)."""
    return name.removesuffix(PY_SUFFIX)


def _onnx_io(onnx_path: Path) -> tuple[int, int]:
    """(n_sparse, n_dense) from the ONNX file's input shapes (checks the contract names)."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    shapes = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.input
    }
    outs = [o.name for o in g.output]
    if set(shapes) != {features.INPUT_SPARSE, features.INPUT_DENSE} or outs != [
        features.OUTPUT_PROB
    ]:
        raise PublishError(
            f"{onnx_path}: inputs {sorted(shapes)} / outputs {outs} do not follow "
            f"the contract ({features.INPUT_SPARSE}, {features.INPUT_DENSE} -> "
            f"{features.OUTPUT_PROB})"
        )
    return int(shapes[features.INPUT_SPARSE][1]), int(shapes[features.INPUT_DENSE][1])


def model_config(
    name: str,
    flavour: str,
    versions: list[int] | None,
    n_sparse: int,
    n_dense: int,
    max_batch_size: int = 8192,
    instances: int | None = None,
    preferred_batch_sizes: tuple[int, ...] = (256, 1024, 4096),
    max_queue_delay_us: int = 500,
    intra_op_threads: int = 0,
) -> str:
    """config.pbtxt text. ``flavour``: "onnxruntime" (GPU) or "python" (CPU).
    ``versions``: the specific versions to serve (None: the latest one)."""
    if versions:
        listed = ", ".join(str(v) for v in sorted(versions))
        policy = f"version_policy: {{ specific: {{ versions: [ {listed} ] }} }}"
    else:
        policy = "version_policy: { latest: { num_versions: 1 } }"
    pref = ", ".join(str(b) for b in preferred_batch_sizes if b <= max_batch_size)
    head = 'platform: "onnxruntime_onnx"' if flavour == "onnxruntime" else 'backend: "python"'
    kind = "KIND_GPU" if flavour == "onnxruntime" else "KIND_CPU"
    count = instances or (2 if flavour == "onnxruntime" else 1)
    extra = ""
    if flavour == "python":
        extra = (
            'parameters: { key: "device" value: { string_value: "auto" } }\n'
            f'parameters: {{ key: "intra_op_threads" value: {{ string_value: "{int(intra_op_threads)}" }} }}\n'
        )
    return f"""# written by models/publish.py - do not edit by hand (the next publish rewrites it)
name: "{name}"
{head}
max_batch_size: {max_batch_size}
{policy}
input [
  {{ name: "{features.INPUT_SPARSE}" data_type: TYPE_INT64 dims: [ {n_sparse} ] }},
  {{ name: "{features.INPUT_DENSE}" data_type: TYPE_FP32 dims: [ {n_dense} ] }}
]
output [
  {{ name: "{features.OUTPUT_PROB}" data_type: TYPE_FP32 dims: [ 1 ] }}
]
instance_group [ {{ count: {count} kind: {kind} }} ]
dynamic_batching {{
  preferred_batch_size: [ {pref} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
{extra}"""


def versions_on_disk(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name)
    )


@contextmanager
def _repo_lock(repo: Path, base: str):
    repo.mkdir(parents=True, exist_ok=True)
    with open(repo / f".{base}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _ControlClient:
    """A ``tritonclient.grpc`` client whose model-repository calls carry the control key."""

    _CONTROL = ("load_model", "unload_model", "get_model_repository_index")

    def __init__(self, settings: Settings, url: str | None = None):
        import tritonclient.grpc as grpcclient

        self._settings = settings
        self.url = url or settings.triton.grpc_url
        self._client = grpcclient.InferenceServerClient(self.url)
        self._headers = triton_control_headers(settings, "grpc")

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name not in self._CONTROL:
            return attr

        def call(*args, **kwargs):
            from tritonclient.utils import InferenceServerException

            kwargs.setdefault("headers", self._headers or None)
            try:
                return attr(*args, **kwargs)
            except InferenceServerException as e:
                if "restricted" not in str(e):
                    raise
                raise PublishError(self._refused(name)) from None

        return call

    def _refused(self, call: str) -> str:
        s = self._settings
        if s.triton.control_key:
            which = "the key in CTRSTREAM_TRITON__CONTROL_KEY"
        elif triton_control_key(s):
            which = f"the key in {s.run_dir}"
        else:
            which = f"no key (none in CTRSTREAM_TRITON__CONTROL_KEY or {s.run_dir}), which"
        return (
            f"Triton at {self.url} refused {call}: model control needs the key Triton "
            f"was started with, and {which} does not match. Run with the stack's run directory "
            "(CTRSTREAM_RUN_DIR) or set CTRSTREAM_TRITON__CONTROL_KEY to Triton's key."
        )


def control_client(settings: Settings, url: str | None = None):
    """A gRPC Triton client (``tritonclient.grpc``) whose ``load_model`` and ``unload_model``
    send the control key - for the publisher, and for tests and benchmarks that load models
    by hand. ``url``: which server (default: the first of ``settings.triton.grpc_urls``)."""
    return _ControlClient(settings, url)


def _clients(settings: Settings) -> list[_ControlClient]:
    """A control client for every Triton server of ``settings``."""
    return [control_client(settings, u) for u in settings.triton.grpc_urls]


def _close_all(clients: list) -> None:
    for c in clients:
        c.close()


def _loaded_everywhere(clients: list, name: str) -> list[int]:
    """The versions of ``name`` ready on any of the servers (sorted)."""
    return sorted({v for c in clients for v in loaded_versions(c, name)})


def _check_served(clients: list, name: str, want: list[int], what: str) -> None:
    """Raise :class:`PublishError` unless every server serves exactly ``want``."""
    for c in clients:
        now = loaded_versions(c, name)
        if now != want:
            raise PublishError(f"{what} Triton at {c.url} serves {name} {now}, expected {want}")


def read_served(settings: Settings) -> dict:
    """The served record (``{"models": {name: {...}}, "pins": {name: {owner: [v, ...]}}}``;
    empty when there is none)."""
    try:
        doc = json.loads(settings.triton.served_record.read_text())
    except FileNotFoundError:
        return {"models": {}, "pins": {}}
    except ValueError:
        doc = None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("models"), dict)
        or not isinstance(doc.setdefault("pins", {}), dict)
        or not all(
            isinstance(owners, dict)
            and all(
                isinstance(vs, list) and all(isinstance(v, int) for v in vs)
                for vs in owners.values()
            )
            for owners in doc["pins"].values()
        )
    ):
        raise PublishError(
            f"{settings.triton.served_record} is not a served record "
            '({"models": {...}, "pins": {model: {owner: [versions]}}}): remove it and '
            "publish again"
        )
    return doc


@contextmanager
def _record_lock(settings: Settings) -> Iterator[None]:
    """Serializes the read-modify-write of the served record (publishes of different models
    and pins each rewrite it)."""
    path = settings.triton.served_record
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name("." + path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_record(settings: Settings, doc: dict) -> None:
    """Atomic replace: a Triton that starts at any moment reads the previous record or this."""
    path = settings.triton.served_record
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def record_served(settings: Settings, name: str, base_name: str, versions: list[int]) -> None:
    """Record that ``name`` serves ``versions`` (the pins are kept as they are)."""
    with _record_lock(settings):
        doc = read_served(settings)
        doc["models"][name] = {
            "base_name": base_name,
            "versions": sorted(versions),
            "recorded_at_ms": int(time.time() * 1000),
        }
        _write_record(settings, doc)


def pinned_versions(settings: Settings, name: str) -> dict[str, list[int]]:
    """Owner -> the versions of served model ``name`` it pins (empty: none)."""
    pins: dict[str, list[int]] = read_served(settings)["pins"].get(name, {})
    return {owner: sorted(vs) for owner, vs in pins.items()}


def _all_pinned(settings: Settings, name: str) -> list[int]:
    return sorted({v for vs in pinned_versions(settings, name).values() for v in vs})


def pin_versions(
    settings: Settings,
    base: str,
    versions: Iterable[int],
    owner: str,
    *,
    load: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Pin ``versions`` of ``base`` for ``owner`` (an experiment name): publishing keeps them
    loaded until ``unpin(settings, owner)``. Replaces the owner's earlier pins of ``base``.
    With ``load``, a pinned version that Triton does not serve yet is loaded now (next to
    the served ones), and the served record lists it, so a restarted Triton loads it too.

    Raises :class:`PublishError` when a version is not in the model repository (pruned, or
    never published) or Triton refuses to load it. Returns ``{"model_name", "pinned",
    "loaded"}`` (served name, the owner's pins, the ready versions after)."""
    want = sorted({int(v) for v in versions})
    if not owner or not re.fullmatch(r"[A-Za-z0-9_.@:\-]+", owner):
        raise PublishError(f"bad pin owner {owner!r} (letters, digits and _ . @ : - only)")
    if not want or want[0] < 1:
        raise PublishError(f"pin which versions? got {list(versions)!r} (numbers >= 1)")
    repo = Path(settings.triton.model_repository)
    served = served_model_name(settings, base)
    with _repo_lock(repo, base):
        missing = sorted(set(want) - set(versions_on_disk(repo / served)))
        if missing:
            raise PublishError(
                f"cannot pin {served} v{missing}: not in the model repository {repo / served} "
                f"(it has {versions_on_disk(repo / served)}); publish it first"
            )
        with _record_lock(settings):
            doc = read_served(settings)
            doc["pins"].setdefault(served, {})[owner] = want
            _write_record(settings, doc)
        loaded = _serve_pinned(settings, base, served, load, log)
    return dict(model_name=served, pinned=want, loaded=loaded)


def _serve_pinned(
    settings: Settings, base: str, served: str, load: bool, log: Callable[[str], None]
) -> list[int]:
    """Make Triton serve every pinned version of ``served`` next to what it serves (the
    caller holds the repository lock). Returns the ready versions (``[]`` without load)."""
    model_dir = Path(settings.triton.model_repository) / served
    if not load or not (model_dir / "config.pbtxt").is_file():
        return []
    clients = _clients(settings)
    try:
        per_server = [loaded_versions(c, served) for c in clients]
        now = sorted({v for vs in per_server for v in vs})
        want = sorted(set(now) | set(_all_pinned(settings, served)))
        if all(vs == want for vs in per_server):
            return now
        onnx_path = model_dir / str(want[-1]) / "model.onnx"
        n_sparse, n_dense = _onnx_io(onnx_path)
        old_config = (model_dir / "config.pbtxt").read_text()
        log(f"loading pinned {served} v{sorted(set(want) - set(now))} next to {now}")
        _write_config(
            model_dir,
            model_config(served, _flavour_of(served, base), want, n_sparse, n_dense),
        )
        try:
            for c in clients:
                c.load_model(served)
        except Exception as e:
            _write_config(model_dir, old_config)
            for c in clients:
                c.load_model(served)
            raise PublishError(f"loading pinned {served} v{want} failed: {e}") from e
        _check_served(clients, served, want, "after pinning,")
        record_served(settings, served, base, want)
        return want
    finally:
        _close_all(clients)


def unpin(settings: Settings, owner: str) -> dict[str, list[int]]:
    """Drop every pin of ``owner``; returns what it pinned (served name -> versions). The
    versions stay loaded until the next publish of their model, which unloads those that
    nobody pins any more."""
    with _record_lock(settings):
        doc = read_served(settings)
        dropped = {}
        for name in list(doc["pins"]):
            vs = doc["pins"][name].pop(owner, None)
            if vs is not None:
                dropped[name] = sorted(vs)
            if not doc["pins"][name]:
                del doc["pins"][name]
        if dropped:
            _write_record(settings, doc)
    return dropped


def _flavour_of(served: str, base: str) -> str:
    return "onnxruntime" if served == base else "python"


def loaded_versions(client, name: str) -> list[int]:
    """Ready versions of ``name`` on the server ([] when it is not loaded)."""
    from tritonclient.utils import InferenceServerException

    try:
        md = client.get_model_metadata(name, as_json=True)
    except InferenceServerException:
        return []
    return sorted(int(v) for v in md.get("versions", []))


def infer(
    client,
    name: str,
    inputs: dict[str, np.ndarray],
    version: int | None = None,
    timeout_s: float | None = None,
) -> np.ndarray:
    """One gRPC inference with the contract's tensors; returns ``prob`` ``[batch, 1]``."""
    import tritonclient.grpc as grpcclient

    ins = []
    for key, dtype in ((features.INPUT_SPARSE, "INT64"), (features.INPUT_DENSE, "FP32")):
        t = grpcclient.InferInput(key, list(inputs[key].shape), dtype)
        t.set_data_from_numpy(inputs[key])
        ins.append(t)
    res = client.infer(
        name,
        ins,
        model_version="" if version is None else str(version),
        outputs=[grpcclient.InferRequestedOutput(features.OUTPUT_PROB)],
        client_timeout=timeout_s,
    )
    return res.as_numpy(features.OUTPUT_PROB)


def verify_version(
    client,
    name: str,
    version: int,
    onnx_path: Path,
    n_sparse: int,
    n_dense: int,
    seed: int = 7,
    atol: float = VERIFY_ATOL,
) -> float:
    """Pinned inferences of ``name`` v``version`` vs in-process ONNX Runtime on probe inputs;
    returns the max abs difference, raises ``PublishError`` above ``atol``."""
    from ctrstream.models.onnx_runtime import ort_predict, ort_session, random_inputs

    sess = ort_session(onnx_path)
    worst = 0.0
    for i, n in enumerate((1, 64, 700)):
        x = random_inputs(n, seed + i, None, n_sparse, n_dense)
        got = infer(client, name, x, version=version)
        want = ort_predict(sess, x)
        if got.shape != want.shape:
            raise PublishError(
                f"{name} v{version}: output shape {got.shape}, expected {want.shape}"
            )
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
    if worst > atol:
        raise PublishError(
            f"{name} v{version} answers probe inputs {worst:.3g} away from "
            f"in-process ONNX Runtime (limit {atol:g})"
        )
    return worst


def _write_config(model_dir: Path, text: str) -> None:
    tmp = model_dir / "config.pbtxt.tmp"
    tmp.write_text(text)
    tmp.replace(model_dir / "config.pbtxt")  # atomic: Triton never reads half a file


def publish(
    settings: Settings,
    onnx_path: str | Path,
    base_name: str,
    card: dict | None = None,
    *,
    load: bool = True,
    keep: int = 3,
    max_batch_size: int = 8192,
    log=lambda msg: None,
) -> dict:
    """Publish ``onnx_path`` as a new version of ``base_name`` (both flavours) and, with
    ``load``, switch the running Triton's served flavour to it (see module doc).

    Every pinned version (:func:`pin_versions`) stays loaded next to the new one; the other
    old versions are unloaded. Returns ``{"version", "model_name" (served), "base_name",
    "previous" (versions served before), "serving" (versions served after: the new one and
    the pinned ones), "loaded", "verify_max_abs_diff", "seconds"}``. Older version
    directories beyond the newest ``keep`` are removed (never a served or pinned one)."""
    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise PublishError(f"no ONNX file at {onnx_path}: run `ctrstream train` first")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", base_name):
        raise PublishError(f"bad model name {base_name!r} (letters, digits, _ and - only)")
    n_sparse, n_dense = _onnx_io(onnx_path)
    repo = Path(settings.triton.model_repository)
    served = served_model_name(settings, base_name)
    flavours = {base_name: "onnxruntime", base_name + PY_SUFFIX: "python"}

    def config(name: str, flavour: str, versions: list[int] | None) -> str:
        return model_config(
            name,
            flavour,
            versions,
            n_sparse=n_sparse,
            n_dense=n_dense,
            max_batch_size=max_batch_size,
        )

    with _repo_lock(repo, base_name):
        clients = _clients(settings) if load else []
        for c in clients:  # every server, before anything changes
            try:
                if not c.is_server_live():
                    raise PublishError("Triton is not live")
            except Exception as e:  # noqa: BLE001 - any failure to ask Triton means "not reachable"
                _close_all(clients)
                raise PublishError(
                    f"Triton at {c.url} is not reachable ({e}); start it with `ctrstream "
                    "stack up`, drop it from CTRSTREAM_TRITON__URLS, or publish with --no-load"
                ) from None
        version = 1 + max([0] + [v for n in flavours for v in versions_on_disk(repo / n)])
        new_dirs = []
        for name, flavour in flavours.items():
            vdir = repo / name / str(version)
            vdir.mkdir(parents=True)
            new_dirs.append(vdir)
            shutil.copy2(onnx_path, vdir / "model.onnx")
            data = onnx_path.with_name(onnx_path.name + ".data")  # external weights, if any
            if data.exists():
                shutil.copy2(data, vdir / data.name)
            if flavour == "python":
                shutil.copy2(TRITON_MODEL_PY, vdir / "model.py")
            if card is not None:
                (vdir / "card.json").write_text(json.dumps(card, indent=2, default=str))
            if name != served:  # the flavour this deployment does not load: serve the latest
                _write_config(repo / name, config(name, flavour, None))
        model_dir = repo / served
        old_config = (
            (model_dir / "config.pbtxt").read_text()
            if (model_dir / "config.pbtxt").exists()
            else None
        )
        previous: list[int] = []
        diff = None
        on_disk = set(versions_on_disk(model_dir))
        pinned = [v for v in _all_pinned(settings, served) if v in on_disk and v != version]
        serve = sorted([version, *pinned])  # what stays loaded after the switch
        if not clients:
            _write_config(model_dir, config(served, flavours[served], serve))
        else:
            previous = [v for v in _loaded_everywhere(clients, served) if v != version]
            _write_config(model_dir, config(served, flavours[served], previous + [version]))
            try:
                for c in clients:  # loaded and verified on every server before any unload
                    log(f"loading {served} v{version} next to {previous or 'nothing'} on {c.url}")
                    c.load_model(served)
                    d = verify_version(c, served, version, onnx_path, n_sparse, n_dense)
                    diff = d if diff is None else max(diff, d)
            except Exception as e:
                _rollback(clients, served, model_dir, old_config, previous, new_dirs)
                _close_all(clients)
                if isinstance(e, PublishError):
                    raise
                raise PublishError(f"loading {served} v{version} failed: {e}") from e
            gone = [v for v in previous if v not in serve]
            log(
                f"{served} v{version} verified (max abs diff {diff:.2g}); unloading "
                f"{gone or 'nothing'}" + (f", keeping pinned {pinned}" if pinned else "")
            )
            _write_config(model_dir, config(served, flavours[served], serve))
            try:
                for c in clients:
                    c.load_model(served)
                _check_served(clients, served, serve, "after the switch")
            finally:
                _close_all(clients)
            record_served(settings, served, base_name, serve)
        _prune(repo, list(flavours), keep, protect={version, *pinned})
    return dict(
        version=version,
        model_name=served,
        base_name=base_name,
        previous=previous,
        serving=serve,
        loaded=load,
        verify_max_abs_diff=diff,
        seconds=round(time.perf_counter() - t0, 2),
    )


def _rollback(clients, served, model_dir, old_config, previous, new_dirs) -> None:
    """Every server back to what it served before the publish; the new version's files go."""
    restore = bool(previous) and old_config is not None
    failed: list[str] = []
    try:
        if restore:
            _write_config(model_dir, old_config)
        for c in clients:  # every server, even when one of them fails
            try:
                if restore:
                    c.load_model(served)
                else:
                    c.unload_model(served)
            except Exception as e:  # noqa: BLE001 - reported below, after the other servers
                failed.append(f"{c.url}: {e}")
    finally:
        for d in new_dirs:
            shutil.rmtree(d, ignore_errors=True)
    if failed and restore:  # a server that did not get the new version needs no unload
        raise PublishError(
            f"rolling {served} back to {previous} failed on {'; '.join(failed)}: load it there "
            "by hand (or restart that Triton: it loads the served record)"
        )


def _prune(repo: Path, names: list[str], keep: int, protect: set[int]) -> None:
    for name in names:
        vs = versions_on_disk(repo / name)
        for v in vs[:-keep] if keep > 0 else []:
            if v not in protect:
                shutil.rmtree(repo / name / str(v), ignore_errors=True)


__all__ = [
    "PublishError",
    "base_model_name",
    "control_client",
    "pin_versions",
    "pinned_versions",
    "read_served",
    "record_served",
    "unpin",
    "infer",
    "loaded_versions",
    "model_config",
    "publish",
    "served_model_name",
    "verify_version",
]
