"""Which planner a source goes to (a file, a folder or a Hub repo id), and OUT_DIR kept apart
from every source before anything is read or written."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from .hub import fetch_pipeline, fetch_unet, is_offline, is_repo_id, looks_local, missing_path, repo_files, snapshot
from .layout import MODEL_INDEX, Options
from .plan import PipelinePlan, Plan, only_unet, plan_lone_folder, plan_pipeline_folder, plan_unet_folder
from .single_file import holds_more_than_a_unet, plan_pipeline_single_file, plan_unet_single_file
from .sources import open_tensors


def _refuse_overlap(out_dir: Path, source: str | Path, what: str) -> None:
    """Refuse an OUT_DIR that is ``source``, lies inside it or contains it: replacing OUT_DIR
    (with --force) or writing its partial folder there would delete or mix into the user's files."""
    out, src = out_dir.expanduser().resolve(), Path(source).expanduser().resolve()
    if out == src or out in src.parents or src in out.parents:
        relation = "is" if out == src else "contains" if out in src.parents else "is inside"
        raise ConversionError(f"OUT_DIR {out_dir} {relation} the {what} {source}; choose a folder outside it.")


def check_out_dir_apart(out_dir: Path, source: str, tokenizers: str | None) -> None:
    """OUT_DIR overlaps neither a local source, a local --tokenizers folder, nor (for Hub ids)
    the Hugging Face cache the files are fetched into."""
    from huggingface_hub.constants import HF_HUB_CACHE

    for what, value in (("source", source), ("--tokenizers source", tokenizers)):
        if value is None:
            continue
        if Path(value).expanduser().exists():
            _refuse_overlap(out_dir, value, what)
        elif is_repo_id(value):
            _refuse_overlap(out_dir, HF_HUB_CACHE, f"Hugging Face cache that {what} {value} is fetched into,")


def _local_source(source: str) -> Path | None:
    """``source`` as an existing path (None for a Hub repo id)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if looks_local(source):
        raise ConversionError(f"{missing_path(source, 'the source')}; check the path.")
    if is_repo_id(source):
        return None
    raise ConversionError(f"{source} is neither a file, a folder nor a Hub repo id (owner/name).")


def plan_source(source: str, options: Options, unet_only: bool, tokenizers: str | None) -> Plan | PipelinePlan:
    """What to write for ``source``: a UNet alone (a Plan) or a whole pipeline."""
    path = _local_source(source)
    if path is not None and path.is_file():
        tensors = open_tensors([path], options.allow_pickle)
        if unet_only:
            return plan_unet_single_file(path, tensors, options)
        if not holds_more_than_a_unet(tensors.shapes):
            return only_unet(plan_unet_single_file(path, tensors, options))
        return plan_pipeline_single_file(path, tensors, options, tokenizers)
    if path is not None:
        if unet_only:
            return plan_unet_folder(path, options)
        if not (path / MODEL_INDEX).is_file():
            return plan_lone_folder(path, options)
        return plan_pipeline_folder(path, options, tokenizers)

    if unet_only:
        plan = plan_unet_folder(fetch_unet(source, options), options)
    elif is_offline():
        folder = snapshot(source, options.revision, None, offline=True)
        if not (folder / MODEL_INDEX).is_file():
            plan = plan_lone_folder(fetch_unet(source, options), options)
        else:
            try:
                plan = plan_pipeline_folder(folder, options, tokenizers)
            except ConversionError as e:
                raise ConversionError(f"HF_HUB_OFFLINE=1 and the cached snapshot of {source} is incomplete: {e}") from None
    else:
        files = repo_files(source, options.revision)
        if MODEL_INDEX in files:
            plan = plan_pipeline_folder(fetch_pipeline(source, options, files), options, tokenizers)
        else:
            plan = plan_lone_folder(fetch_unet(source, options, files), options)
    plan.description = f"Hub repo {source}" + (f"@{options.revision}" if options.revision else "")
    if isinstance(plan, PipelinePlan):
        plan.description += f" ({plan.model_index.get('_class_name', 'diffusers')})"
    return plan
