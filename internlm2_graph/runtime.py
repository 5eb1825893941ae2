"""Running a built folder: ONNX Runtime GenAI, from whichever package provides it.

Building needs no runtime. Running does, from one of two packages that install the same
`onnxruntime_genai` module: `onnxruntime-genai` (the `cpu` extra) or `onnxruntime-genai-cuda`
(the `cuda` extra). Everything that runs a model (verify, chat, the benchmarks, the examples)
opens it here, so a missing or mismatched runtime is one line that names the extra to install.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.speculative import DRAFT_TOKENS, Speculative, preset, with_speculative

INSTALL_CPU = 'pip install "internlm2_graph[cpu]"'
INSTALL_CUDA = 'pip install "internlm2_graph[cuda]"'


class MissingRuntime(InternLM2GraphError):
    """No onnxruntime_genai is importable, or the one installed cannot run this folder."""


def genai() -> ModuleType:
    """The `onnxruntime_genai` module, or a one-line MissingRuntime naming the extra."""
    try:
        import onnxruntime_genai
    except ModuleNotFoundError as err:
        # Only a missing runtime is ours to explain; a broken one keeps its own error.
        if err.name not in ("onnxruntime_genai", "onnxruntime"):
            raise
        # Building runs on Python 3.10; onnxruntime 1.31+ has wheels from 3.11 on only.
        python = "; both need Python 3.11+" if sys.version_info < (3, 11) else ""
        raise MissingRuntime(
            f"running a model needs ONNX Runtime GenAI, which is not installed: {INSTALL_CPU} "
            f"(or {INSTALL_CUDA} on an NVIDIA GPU{python})"
        ) from None
    return onnxruntime_genai


def check_model_folder(model_dir: str | Path) -> None:
    """Fail with a plain message, not the runtime's, when `model_dir` is not a built folder."""
    if not (Path(model_dir) / "genai_config.json").is_file():
        raise InternLM2GraphError(
            f"{model_dir}: not a built model folder (no genai_config.json); pass the --output "
            "folder of an internlm2-graph build"
        )


def genai_config(model_dir: str | Path) -> dict:
    check_model_folder(model_dir)
    return json.loads((Path(model_dir) / "genai_config.json").read_text())


def eos_ids(model_dir: str | Path) -> tuple[int, ...]:
    """The ids that end a reply: eos and, for chat models, the end-of-turn token."""
    eos = genai_config(model_dir)["model"]["eos_token_id"]
    return tuple(eos) if isinstance(eos, list) else (eos,)


def built_for_cuda(model_dir: str | Path) -> bool:
    options = genai_config(model_dir)["model"]["decoder"]["session_options"]["provider_options"]
    return any("cuda" in provider for provider in options)


def load_model(model_dir: str | Path, speculative: str | None = None, overlay: dict | None = None):
    """og.Model of a built folder, after the checks whose failures the runtime words poorly.

    `speculative` (off, ngram, draft) overrides the folder's own speculative decoding for this
    model only (og_config); None keeps what genai_config says.
    `overlay`: genai_config sections to add or change for this model only (og.Config.overlay).
    """
    check_model_folder(model_dir)
    og = genai()
    if built_for_cuda(model_dir) and not og.is_cuda_available():
        raise MissingRuntime(
            f"{model_dir} was built for CUDA (-e cuda) and this onnxruntime-genai has no CUDA: "
            f"{INSTALL_CUDA} in an environment without the [cpu] packages"
        )
    config = og_config(model_dir, speculative)
    if overlay:
        config.overlay(json.dumps(overlay))
    return og.Model(config)


def cpu_threads_overlay(config: dict, cores: int | None, logical: int | None) -> dict | None:
    """The decoder's intra-op thread count for a CPU folder, where og's default is wrong.

    og 0.18 gives a session hardware_concurrency() / 2 threads, assuming two hardware threads
    per core; on a machine without them (most cloud VMs) that idles half the cores: on 2 cores,
    1.8B int4 decoded at 197 ms a token with og's 1 thread and 109 ms with 2. A count the folder
    sets itself is kept, and CUDA folders are left alone (their work is on the GPU).
    """
    decoder = config["model"]["decoder"]
    options = decoder.get("session_options", {})
    if cores is None or "intra_op_num_threads" in options:
        return None
    if any("cuda" in provider for provider in options.get("provider_options", [])):
        return None
    if cores == max(1, (logical or 1) // 2):
        return None  # og's own default already
    return {"model": {"decoder": {"session_options": {"intra_op_num_threads": cores}}}}


def threads_here(config: dict) -> dict | None:
    """cpu_threads_overlay for the cores this process may run on."""
    return cpu_threads_overlay(config, physical_cores(), os.cpu_count())


def physical_cores() -> int | None:
    """Cores this process may run on, counting hardware threads of one core once (Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux: og's default stands
        return None
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or None


def og_config(folder: str | Path, spec: Speculative | str | None = None):
    """An `onnxruntime_genai.Config` for a built folder with `spec`, leaving the folder as it is,
    with as many CPU threads as cores (cpu_threads_overlay).

    og's Config.overlay can add a section but not remove one, so turning off a draft that
    genai_config names loads the model through a temporary folder of links with an edited
    genai_config (the files are opened at load time; the links go when the process ends).
    """
    og = genai()
    folder = Path(folder)
    own = json.loads((folder / "genai_config.json").read_text("utf-8"))
    threads = threads_here(own)
    if spec is None:
        config = og.Config(str(folder))
    else:
        spec = preset(spec, folder) if isinstance(spec, str) else spec
        wanted = with_speculative(own, spec, folder)
        if "draft" in own["model"] and "draft" not in wanted["model"]:
            config = og.Config(str(_linked_copy(folder, wanted)))
        else:
            config = og.Config(str(folder))
            overlay = {"speculative": _all_settings(wanted.get("speculative"))}
            if "draft" in wanted["model"]:
                overlay["model"] = {"draft": wanted["model"]["draft"]}
            config.overlay(json.dumps(overlay))
    if threads:
        config.overlay(json.dumps(threads))
    return config


def _all_settings(section: dict | None) -> dict:
    """Every key, so an overlay also resets what the folder's own section set."""
    settings = {"max_draft_tokens": DRAFT_TOKENS, "ngram_size": 0, "min_adaptive_k": 0}
    return {**settings, **(section or {})}


_LINKED: list[tempfile.TemporaryDirectory] = []


def _linked_copy(folder: Path, config: dict) -> Path:
    temp = tempfile.TemporaryDirectory(prefix="internlm2-graph-")
    _LINKED.append(temp)  # lives as long as the process (the model reads through it)
    copy_path = Path(temp.name)
    for path in folder.iterdir():
        if path.name != "genai_config.json":
            (copy_path / path.name).symlink_to(path.absolute())
    (copy_path / "genai_config.json").write_text(json.dumps(config), encoding="utf-8")
    return copy_path
