"""The hub resources a run needs (a model id, a dataset id), checked together before any of
them is downloaded: without network, transformers and datasets retry each download for a
minute or more and report one resource per try. Here every resource that is neither a local
folder nor in a local cache, where the hub cannot be reached, is named in one line, with the
command that downloads it."""
from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..errors import UsageError

PROBE_SECONDS = 10.0  # how long the hub may take to answer whether it is there at all


def needed(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """(flag, repo id, repo type) of every hub resource the run would download."""
    from ..data import KNOWN
    out = []
    if cfg.model != "embedded" and not Path(cfg.model).exists():
        out.append(("--model", cfg.model, "model"))
    name = cfg.data.dataset or ("cifar10" if cfg.data.load_cifar else None)
    if name and (name in KNOWN or "/" in name) and not cfg.output.dry_run and \
            not Path(name).exists():  # (other names are refused by name)
        out.append(("--dataset", KNOWN[name][0] if name in KNOWN else name, "dataset"))
    return out


def cached(repo: str, kind: str) -> bool:
    """Whether `repo` was downloaded before (the hub cache; for a dataset, datasets' own too)."""
    from huggingface_hub import try_to_load_from_cache
    first = "config.json" if kind == "model" else "README.md"
    hit = try_to_load_from_cache(repo, first, repo_type=kind)
    if isinstance(hit, str):
        return True
    if kind == "dataset":
        import datasets
        return (Path(datasets.config.HF_DATASETS_CACHE) / repo.replace("/", "___")).exists()
    return False


def reachable() -> bool:
    """Whether the hub answers (never asked with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import HfApi, constants
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        HfApi().model_info("google/vit-base-patch16-224", timeout=PROBE_SECONDS)
        return True
    except Exception:  # noqa: BLE001 - no network, a proxy, a timeout: all mean "not now"
        return False


def check_hub(cfg: RunConfig) -> None:
    """One UsageError naming every hub resource the run needs that it cannot get."""
    missing = [(flag, repo, kind) for flag, repo, kind in needed(cfg) if not cached(repo, kind)]
    if not missing or reachable():
        return
    names = " and ".join(f"{flag} {repo}" for flag, repo, _ in missing)
    commands = "; ".join(f"hf download {repo}" + (" --repo-type dataset" if kind == "dataset" else "")
                         + " --local-dir DIR" for _, repo, kind in missing)
    offline = " and ".join(dict.fromkeys(  # what runs offline instead, per kind missing
        "--model embedded" if kind == "model" else "--dataset digits" for _, _, kind in missing))
    raise UsageError(f"{names}: not in the local cache and the hub cannot be reached; download "
                     f"where there is network ({commands}) and pass the folder, or use "
                     f"{offline} (HF_HUB_OFFLINE=1 skips the download retries)", missing[0][0][2:])
