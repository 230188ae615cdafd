"""HF transformers' model of the same checkpoint: the reference our engine is held to. One class serves the tests,
`--reference hf` (greedy tokens and their log-probs) and `--backend hf` (the same workload timed through HF).

Requests are the dicts `LLM.generate` takes: {"prompt", "multi_modal_data"} (text and pictures) or
{"prompt_token_ids", "mm_inputs"} (already processed). Text prompts with images go through HF's own processor
where transformers can build it, so that our processing is checked too (`hf_processor=False`, or no such processor:
the family's adapter); processed requests reach HF's model exactly as our engine got them."""
import torch

from vllm_utils.config import DTYPES, EngineConfig, ResolvedConfig
from vllm_utils.engine.resolve import resolve
from vllm_utils.llm import multi_modal_items
from vllm_utils.models.registry import family
from vllm_utils.multimodal.processor import ProcessorAdapter


# inputs of HF's models with one entry per token, and what a text token appended to the prompt has there (None: its id)
_PER_TOKEN = {"input_ids": None, "attention_mask": 1, "token_type_ids": 0, "mm_token_type_ids": 0}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


class HFReference:
    """`model`: a model folder (resolved here) or a configuration already resolved; dummy weights are HF's own
    random ones (`from_config`). `processor`: the family's adapter when the caller has built it already."""

    def __init__(self, model: str | ResolvedConfig, dtype: str | torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", model_type: str | None = None,
                 processor: ProcessorAdapter | None = None, hf_processor: bool = True) -> None:
        from transformers import AutoModelForImageTextToText, GenerationConfig

        self.config = model if isinstance(model, ResolvedConfig) else resolve(EngineConfig(model), model_type)
        self.dtype, self.device = _dtype(dtype), torch.device(device)
        dummy = self.config.engine.load_format == "dummy"
        self.processor = processor or family(self.config.model_type).processor(
            self.config.folder, self.config.hf_config, allow_missing=dummy,
            processor_kwargs=self.config.engine.mm_processor_kwargs)
        self.hf_processor = self.processor.hf_processor if hf_processor else None
        if dummy:
            torch.manual_seed(self.config.engine.seed)  # --seed seeds random weights here too
            with torch.device(self.device):
                self.model = AutoModelForImageTextToText.from_config(self.config.hf_config, dtype=self.dtype)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(self.config.folder, dtype=self.dtype)
            self.model.to(self.device)
        self.model.eval()
        # plain decoding, as our engine does: none of the checkpoint's generation defaults (a repetition penalty, a
        # temperature); EOS ends a run only where the caller asks (`ignore_eos` runs past it, as SamplingParams do)
        eos = self.processor.eos_token_id
        self.model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=eos if eos is not None else 0)

    # ---- text ------------------------------------------------------------------------------------
    def chat_prompt(self, text: str, num_images: int = 1) -> str:
        """A user turn of images then text, rendered by HF's processor where it is used, else by the adapter."""
        if self.hf_processor is None:
            return self.processor.chat_prompt(text, num_images)
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        return self.hf_processor.apply_chat_template([{"role": "user", "content": content}],
                                                     add_generation_prompt=True)

    def decode(self, token_ids: list[int]) -> str:
        return self.processor.decode(token_ids)

    # ---- inputs ----------------------------------------------------------------------------------
    def inputs(self, request: dict) -> dict[str, torch.Tensor]:
        """HF's model inputs of one request (a batch of one), on the reference's device and dtype."""
        images, videos = multi_modal_items(request)
        if "prompt_token_ids" in request:
            ids, mm_inputs = request["prompt_token_ids"], request.get("mm_inputs")
        elif self.hf_processor is not None and not videos:
            out = self.hf_processor(text=request["prompt"], images=self.processor.prompt_images(images) or None,
                                    return_tensors="pt", **self.processor.processor_kwargs)
            return self._placed(dict(out))
        else:
            ids, mm_inputs = self.processor.process(request["prompt"], images, videos)
        return self.model_inputs(torch.tensor([ids]), [mm_inputs] if mm_inputs else [])

    def model_inputs(self, input_ids: torch.Tensor, mm_inputs: list[dict]) -> dict[str, torch.Tensor]:
        """HF's inputs for a batch of token ids (left-padded rows, zeros in `attention_mask` where padded is the
        caller's) and the items of its prompts in order."""
        from vllm_utils.multimodal.inputs import concat_mm_inputs

        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        inputs.update(concat_mm_inputs([self.processor.hf_model_inputs(mm) for mm in mm_inputs]))
        inputs.update(self.processor.hf_token_inputs(input_ids))
        return self._placed(inputs)

    def _placed(self, inputs: dict) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()}

    # ---- outputs ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def greedy(self, request: dict, max_tokens: int, ignore_eos: bool = False) -> list[int]:
        """HF's greedy tokens: up to and including EOS, or `max_tokens` whatever comes (`ignore_eos`, as our
        SamplingParams: EOS may be among them, nothing is suppressed)."""
        return self._generate(request, max_tokens, ignore_eos, logprobs=False)[0]

    @torch.inference_mode()
    def greedy_with_logprobs(self, request: dict, max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens up to EOS and the log-probability HF gave each."""
        return self._generate(request, max_tokens, ignore_eos=False, logprobs=True)

    def _generate(self, request: dict, max_tokens: int, ignore_eos: bool, logprobs: bool):
        inputs = self.inputs(request)
        eos = self.processor.eos_token_ids
        stop = {} if ignore_eos or not eos else {"eos_token_id": eos}
        out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, output_logits=logprobs,
                                  return_dict_in_generate=True, **stop)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        ends = [i for i, t in enumerate(tokens) if t in eos]
        if not ignore_eos and ends:
            tokens = tokens[: ends[0] + 1]
        if not logprobs:
            return tokens, None
        return tokens, [float(step[0].float().log_softmax(-1)[t]) for step, t in zip(out.logits, tokens)]

    @torch.inference_mode()
    def token_logprobs(self, request: dict, tokens: list[int]) -> list[float]:
        """The log-probability HF gives each of `tokens` when they follow the prompt (teacher forcing, one pass)."""
        if not tokens:
            return []
        inputs = self.inputs(request)
        more = torch.tensor([tokens], dtype=torch.long, device=self.device)
        for key, fill in _PER_TOKEN.items():  # the continuation is text: no image, no token type
            if key in inputs:
                extra = more if fill is None else torch.full_like(more, fill, dtype=inputs[key].dtype)
                inputs[key] = torch.cat([inputs[key], extra], dim=1)
        logits = self.model(**inputs, logits_to_keep=len(tokens) + 1).logits  # some models ignore logits_to_keep
        logits = logits[0, -(len(tokens) + 1):-1].float()
        return logits.log_softmax(-1).gather(-1, more[0, :, None]).squeeze(-1).tolist()
