"""A spec -> the run's plan, once and before any weights load: the model (the family's tiny default one where none
is given), the configuration resolved against it, the processor, the platform, the mode's inputs built and every
check that needs them (lengths, placeholders, optional packages, result files). The modes read the plan; nothing
after it builds a processor or a platform, or applies a default."""
import importlib.util
import os
import sys
from dataclasses import dataclass, replace

from vllm_utils.config import DEFAULT_MAX_NUM_SEQS, EngineConfig, ResolvedConfig
from vllm_utils.engine.resolve import resolve
from vllm_utils.errors import UserError
from vllm_utils.modes import inputs
from vllm_utils.modes.files import check_distinct, check_new_file, probe_folder
from vllm_utils.modes.spec import AccSpec, DemoSpec, PerfSpec, ReportSpec, Spec
from vllm_utils.multimodal.processor import ProcessorAdapter
from vllm_utils.platforms import Platform, default_device, platform_for, resolve_device


@dataclass(frozen=True)
class Plan:
    spec: Spec
    model: str  # the folder or bundled name that runs (the default model's folder where none was given)
    config: ResolvedConfig
    processor: ProcessorAdapter
    platform: Platform
    inputs: inputs.DemoInputs | inputs.PerfInputs | inputs.AccInputs

    @property
    def mode(self) -> str:
        return self.spec.mode


def make_plan(spec: Spec) -> Plan:
    engine = spec.engine
    if engine.model_type is not None:
        from vllm_utils.models.registry import check_model_type

        check_model_type(engine.model_type)
    if isinstance(spec, (PerfSpec, AccSpec)):
        check_report_files(spec.report, getattr(spec, "save_output", None))
    resolve_device(engine.device or default_device())
    if getattr(spec, "reference", None) is not None:
        resolve_device(spec.reference.device, flag="--reference-device")
    notes: list[str] = []  # said once everything is checked: an error is the only line a bad run prints
    model, default_image = default_model(spec, notes)
    samples = inputs.read_samples(spec) if isinstance(spec, AccSpec) else None
    config = resolve_config(spec, model)
    processor = config_processor(config, engine.load_format == "dummy")
    check_reads_text(spec, model, processor)
    check_optional_packages(spec, samples)
    if isinstance(spec, DemoSpec):
        mode_inputs = inputs.demo_inputs(spec, config, processor, default_image, notes)
    elif isinstance(spec, PerfSpec):
        mode_inputs = inputs.perf_inputs(spec, config, processor)
    else:
        mode_inputs = inputs.acc_inputs(spec, config, processor, samples, notes)
    config = batch_of(config, count_requests(spec, mode_inputs), engine.batch_size, notes)
    for note in notes:
        print(note, file=sys.stderr)
    return Plan(spec, model, config, processor, platform_for(config.device), mode_inputs)


def check_report_files(report: ReportSpec, save_output: str | None) -> None:
    """Every file a run will write, checked before it starts, so that no result is lost at its end."""
    csv = os.path.join(report.result_dir, report.result_filename) if report.save_result and \
        report.result_filename else None
    check_distinct({"--result-filename": csv, "--output-json": report.output_json, "--save-output": save_output})
    if save_output:
        check_new_file(save_output, "--save-output", "samples.jsonl")
    if report.save_result:
        if report.result_filename:
            check_new_file(os.path.join(report.result_dir, report.result_filename), "--result-filename", "result.csv")
        else:
            fix = "run from a writable working directory or pass --result-dir" if report.result_dir == "." else \
                "choose a writable --result-dir"
            probe_folder(report.result_dir, "the result CSV", fix)
    if report.output_json:
        check_new_file(report.output_json, "--output-json", "result.json")


def default_model(spec: Spec, notes: list[str]) -> tuple[str, str | None]:
    """The model folder to run and, where none was given, the default model's picture (and a note saying which)."""
    if spec.engine.model is not None:
        return spec.engine.model, None
    from vllm_utils.testing.default_model import default_model as build

    family = spec.engine.model_type or "llava"
    built = build(family)
    name = {"llava": "LLaVA"}.get(family, family)
    if isinstance(spec, PerfSpec):
        from vllm_utils.bundled import bundled_names

        hub = next(iter(bundled_names(family)), None)
        notes.append(f"No --model given: benchmarking the tiny random {name} at {built.folder}; pass --model PATH"
                     + (f" (or --model {hub} --load-format dummy)." if hub else "."))
    else:
        notes.append(f"No --model given: {'built' if built.built else 'using'} a tiny {name} with RANDOM weights at "
                     f"{built.folder} (its text is gibberish by design); pass --model PATH for a real checkpoint.")
    return built.folder, built.image


def count_requests(spec: Spec, mode_inputs) -> int:
    if isinstance(spec, DemoSpec):
        return len(mode_inputs.requests)
    if isinstance(spec, PerfSpec):
        return spec.num_prompts
    return len(mode_inputs.samples)


def batch_of(config: ResolvedConfig, requests: int, asked: int | None, notes: list[str]) -> ResolvedConfig:
    """The batch: --batch-size, else every request (at most 256), and never more than the run's requests (the KV
    cache is sized for it)."""
    batch = min(asked or DEFAULT_MAX_NUM_SEQS, requests)
    if asked is not None and asked > requests:
        notes.append(f"note: --batch-size {asked} is more than the {requests} request(s) of this run; running at "
                     f"most {requests} at once")
    return replace(config, max_num_seqs=batch, engine=replace(config.engine, max_num_seqs=batch))


def resolve_config(spec: Spec, model: str) -> ResolvedConfig:
    """The engine's configuration resolved against the model's, once (the batch is set when the requests are
    known)."""
    engine = spec.engine
    config = resolve(EngineConfig(
        model=model, device=engine.device or default_device(), dtype=engine.dtype,
        max_model_len=engine.max_model_len, block_size=engine.block_size,
        max_num_batched_tokens=engine.max_num_batched_tokens, num_kv_blocks=engine.num_kv_blocks,
        enforce_eager=engine.enforce_eager, tensor_parallel_size=engine.tensor_parallel_size, seed=engine.seed,
        load_format=engine.load_format, mm_processor_kwargs=engine.mm_processor_kwargs,
        enable_prefix_caching=engine.enable_prefix_caching), engine.model_type)
    if engine.block_size > config.max_model_len:
        raise UserError(f"--block-size {engine.block_size} is larger than the longest sequence (max model length "
                        f"{config.max_model_len}); use a block of at most that many tokens (16, 32 or 64 are usual)")
    return config


def config_processor(config: ResolvedConfig, dummy: bool) -> ProcessorAdapter:
    """The family's processor of the folder: its files, not the weights."""
    from vllm_utils.models.registry import family

    return family(config.model_type).processor(config.folder, config.hf_config, allow_missing=dummy,
                                               processor_kwargs=config.engine.mm_processor_kwargs)


def check_reads_text(spec: Spec, model: str, processor: ProcessorAdapter) -> None:
    """--demo and --acc tokenize text: the model folder must hold a tokenizer."""
    if processor.tokenizer is None and not isinstance(spec, PerfSpec):
        raise UserError(f"--model {model} has no tokenizer files, and --{spec.mode} tokenizes text: point --model at "
                        f"the complete model folder (only --perf runs without them, with --load-format dummy)")


# optional packages: (the module, what needs it, the extra that installs it); the readers name `datasets`
_VIDEO = ("av", "decoding --input-video", "video")
_ROUGE = ("rouge_score", "scoring ROUGE-L", "acc")
_EDITS = ("rapidfuzz", "edit distances (ANLS, OCR)", "acc")
_OCR = [("nltk", "Fox's OCR measures", "acc"), ("jieba", "Fox's OCR measures (Chinese words)", "acc")]


def check_optional_packages(spec: Spec, samples: list | None) -> None:
    """What a mode needs beyond the core install, named with its pip command before anything loads."""
    needed = []
    if getattr(spec, "videos", None) or getattr(spec, "video", None) or any(s.videos for s in samples or []):
        needed.append(_VIDEO)
    metrics = {s.metric for s in samples or []}
    if "rouge" in metrics:
        needed.append(_ROUGE)
    if metrics & {"anls", "ocr"}:
        needed.append(_EDITS)
    if "ocr" in metrics:
        needed.extend(_OCR)
    for module, what, extra in needed:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{what} needs the `{module}` package: pip install 'vllm_utils[{extra}]'")
