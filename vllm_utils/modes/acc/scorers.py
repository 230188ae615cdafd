"""Each task family's score of one reply, as that dataset's own evaluation defines it; every score is in [0, 1]."""
import functools
import random
import re
import warnings
from dataclasses import dataclass

from vllm_utils.modes.acc.vqa_normalize import normalize_answer

ANLS_THRESHOLD = 0.5
NO_LETTER = "(no letter)"  # a multiple-choice reply the evaluation reads no letter from
# Video-MME: as the benchmark's `eval_your_results.py` lists them, two pairs run together by missing commas
_VIDEO_MME_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                       "The best option isThe correct option is", "Best answer:Best option:"]


def rouge_l(reply: str, reference: str) -> float:
    """ROUGE-L F-measure (Google's `rouge-score`, its default tokenizer, no stemming)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, reply)["rougeL"].fmeasure


def vqa_accuracy(reply: str, answers: list[str]) -> float:
    """VQA accuracy as the official evaluation computes it: both sides normalised (`normalize_answer`); for each
    of the human answers, min(1, matches among the other ones / 3); averaged over them (the 10-choose-9 subsets)."""
    if not answers:
        return 0.0
    reply = normalize_answer(reply)
    gts = [normalize_answer(a) for a in answers]
    accs = [min(1.0, sum(other == reply for j, other in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def anls(reply: str, answers: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one question (DocVQA's metric): the best over the answers of
    1 - distance / longer length (case and surrounding space ignored), or 0 when that distance is >= threshold."""
    from rapidfuzz.distance import Levenshtein

    best = 0.0
    pred = " ".join(reply.strip().lower().split())
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        longest = max(len(gt), len(pred))
        nl = Levenshtein.distance(gt, pred) / longest if longest else 0.0
        best = max(best, 1 - nl if nl < threshold else 0.0)
    return best


def choice_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def render_choices(question: str, choices: list[str]) -> str:
    """MMMU's multiple-choice prompt: the question, then `(A) option` lines, then the instruction."""
    options = "".join(f"({letter}) {option}\n" for letter, option in zip(choice_letters(len(choices)), choices))
    return f"{question}\n\n{options}\n\nAnswer with the option's letter from the given choices directly."


@dataclass
class ParsedChoice:
    letter: str
    guessed: bool  # no letter or option text found in the reply: a random pick, as MMMU's evaluation does


def parse_choice(reply: str, choices: list[str], rng: random.Random) -> ParsedChoice:
    """MMMU's `parse_multi_choice_response`: "(B)" first, then a bare " B ", then (replies over 5 words) an
    option's text; the last one mentioned wins; none: a random letter."""
    letters = choice_letters(len(choices))
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        reply = reply.strip(char)
    reply = f" {reply} "
    bracketed = [c for c in letters if f"({c})" in reply]
    candidates = bracketed or [c for c in letters if f" {c} " in reply]
    by_text = False
    if not candidates and len(reply.split()) > 5:
        candidates = [c for c, option in zip(letters, choices) if option.lower() in reply.lower()]
        by_text = True
    if not candidates:
        return ParsedChoice(rng.choice(letters), True)
    if len(candidates) == 1:
        return ParsedChoice(candidates[0], False)
    if by_text:
        where = [reply.lower().rfind(choices[letters.index(c)].lower()) for c in candidates]
    else:
        where = [reply.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    return ParsedChoice(candidates[where.index(max(where))], False)


def extract_letter(reply: str) -> str:
    """The letter Video-MME's evaluation reads from a reply: the first capital A-D once its answer phrases are
    removed, wherever it stands (the "A" of "After" too, as there); "" where there is none."""
    for prefix in _VIDEO_MME_PREFIXES:
        reply = reply.replace(prefix, "")
    found = re.search(r"[ABCD]", reply)
    return found[0] if found else ""


def open_answer(reply: str, answers: list[str]) -> float:
    """MMMU's open questions, simplified: 1 when a normalised answer appears in the normalised reply (MMMU's own
    rule also extracts and compares numbers)."""
    reply = normalize_answer(reply)
    return float(any(normalize_answer(a) and normalize_answer(a) in reply for a in answers))


def ocr_measures(reply: str, label: str) -> dict[str, float]:
    """Fox's and GOT-OCR2's OCR measures of one reply, as their `eval_ocr_test.py` / `eval_ocr.py` compute them:
    words split on spaces, or by jieba where either side holds Chinese; BLEU and METEOR (nltk) on the word lists,
    F1, precision and recall (nltk) on the word sets, and the edit distance over characters divided by the longer
    length. Those scripts pass the label where their function takes the prediction, so their BLEU and METEOR score
    the label against the reply, and their precision is the share of the label's words the reply holds (their
    recall the converse): the same here, so that figures compare with the published ones. METEOR needs nltk's WordNet data: None without it."""
    import nltk
    from nltk.metrics import f_measure, precision, recall
    from rapidfuzz.distance import Levenshtein

    pred, gt = label, reply  # the published scripts' order
    if _CHINESE.search(gt) or _CHINESE.search(pred):
        reference, hypothesis = _jieba_words(gt), _jieba_words(pred)
    else:
        reference, hypothesis = gt.split(), pred.split()
    with warnings.catch_warnings():  # nltk warns of every reply without 3- or 4-gram overlaps
        warnings.simplefilter("ignore", UserWarning)
        bleu = float(nltk.translate.bleu([reference], hypothesis))
    measures = {"bleu": bleu, "meteor": _meteor(reference, hypothesis)}
    ref_set, hyp_set = set(reference), set(hypothesis)
    measures["f1"] = f_measure(ref_set, hyp_set) or 0.0  # nltk: None where a side is empty
    measures["precision"] = precision(ref_set, hyp_set) or 0.0
    measures["recall"] = recall(ref_set, hyp_set) or 0.0
    longest = max(len(pred), len(gt))
    measures["edit_distance"] = Levenshtein.distance(pred, gt) / longest if longest else 0.0
    return measures


_CHINESE = re.compile(r"[\u4e00-\u9fa5]")


def _jieba_words(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba.lcut(text)


def _meteor(reference: list[str], hypothesis: list[str]) -> float | None:
    """None for every reply where nltk has no WordNet data (without it nltk scores only replies whose words all
    match exactly: a mean of those would be too high)."""
    if not _has_wordnet():
        from vllm_utils.notes import note_once

        note_once("METEOR needs nltk's WordNet data (python -m nltk.downloader wordnet): left out of the OCR "
                  "measures")
        return None
    from nltk.translate import meteor_score

    return float(meteor_score.meteor_score([reference], hypothesis))


@functools.cache
def _has_wordnet() -> bool:
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        return True
    except LookupError:
        return False


def score(metric: str, reply: str, references: list[str], choices: list[str] | None,
          rng: random.Random) -> tuple[float, str | None, dict | None]:
    """The sample's score, what was parsed from the reply (the letter of a multiple-choice reply), and the
    measures of a metric that reports several (OCR: its F1 is the score)."""
    if metric == "ocr":
        measures = ocr_measures(reply, references[0])
        return measures["f1"], None, measures
    if metric == "rouge":
        return rouge_l(reply, references[0]), None, None
    if metric == "choice":
        parsed = parse_choice(reply, choices or [], rng)
        return float(parsed.letter == references[0]), parsed.letter + (" (guessed)" if parsed.guessed else ""), None
    if metric == "vqa":
        return vqa_accuracy(reply, references), None, None
    if metric == "anls":
        return anls(reply, references), None, None
    if metric == "videomme":
        letter = extract_letter(reply)
        return float(letter.lower() == references[0].lower()), letter or NO_LETTER, None
    return open_answer(reply, references), None, None
