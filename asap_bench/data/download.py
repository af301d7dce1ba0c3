"""Download helpers for the hub-hosted datasets (CT-RATE, RadGenome-ChestCT).

Both are gated: accept the terms on the dataset page and pass a token. By
default only the small tables are fetched (labels, reports, metadata, VQA);
volumes are opt-in. Files land in the official layout, so the result is a
valid ``--source`` for ``asap-bench datasets prepare``.
"""

from __future__ import annotations

from pathlib import Path

HUB = {
    "ct-rate": {
        "repo": "ibrahimhamamci/CT-RATE",
        "tables": ["dataset/multi_abnormality_labels/*", "dataset/radiology_text_reports/*", "dataset/metadata/*"],
        "volumes": ["dataset/train_fixed/*", "dataset/valid_fixed/*"],  # the re-release with corrected headers
    },
    "radgenome": {
        "repo": "RadGenome/RadGenome-ChestCT",
        "tables": ["dataset/radgenome_files/*"],
        "volumes": ["dataset/train_preprocessed/*", "dataset/valid_preprocessed/*"],
    },
}


class DownloadError(RuntimeError):
    """The hub could not be reached or refused the request; says why and what to do."""


def allow_patterns(name: str, patterns: list[str] | None = None, volumes: bool = False) -> list[str]:
    if name not in HUB:
        raise KeyError(f"no download helper for {name!r}; hub-hosted datasets: {', '.join(sorted(HUB))}")
    spec = HUB[name]
    chosen = list(patterns) if patterns else list(spec["tables"])
    return chosen + (list(spec["volumes"]) if volumes else [])


def download(name: str, out: Path | str, *, patterns: list[str] | None = None, volumes: bool = False,
             token: str | None = None) -> Path:
    """``snapshot_download`` of the dataset's files matching the allow-patterns into ``out``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    allow = allow_patterns(name, patterns, volumes)
    repo = HUB[name]["repo"]
    out = Path(out).expanduser()
    try:
        path = snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=allow, local_dir=str(out),
                                 token=token)
    except GatedRepoError:
        raise DownloadError(f"{repo} is gated: accept its terms at https://huggingface.co/datasets/{repo} and pass "
                            "--token (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{repo}: not found, or not visible without a token (--token / HF_TOKEN)") from None
    except LocalEntryNotFoundError as err:
        raise DownloadError(f"cannot download {repo}: the hub is unreachable or offline mode is on "
                            f"(HF_HUB_OFFLINE); {str(err).splitlines()[0]}") from None
    except (HfHubHTTPError, OSError) as err:
        raise DownloadError(f"cannot download {repo}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return Path(path)
