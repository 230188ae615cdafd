"""A streamed output's text, piece by piece: each step's text is the decoded output so far, less what may still
change (an incomplete UTF-8 character, the start of a stop string); the last piece makes the whole equal to the
text `LLM.generate` gives for the same tokens (the stop string or EOS cut as it cuts them)."""
from vllm_utils.engine.sequence import Sequence
from vllm_utils.llm import LLM
from vllm_utils.sampling_params import SamplingParams


class TextStream:
    def __init__(self, processor, params: SamplingParams) -> None:
        self.processor, self.params = processor, params
        self.token_ids: list[int] = []
        self.sent = ""
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may still be completing

    def add(self, token_ids: list[int]) -> str:
        self.token_ids += token_ids
        text = self.processor.decode(self.token_ids, self.params.skip_special_tokens)
        stable = (text[: len(text) - self.hold] if self.hold else text).rstrip("\ufffd")
        return self._emit(stable)

    def final(self, llm: LLM, seq: Sequence) -> str:
        """The rest of the text, once `seq` has finished (the engine no longer touches it)."""
        return self._emit(llm._completion(seq).text)

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece
