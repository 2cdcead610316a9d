"""VQA metrics as pure functions: VQAv2/TextVQA accuracy, exact match, multiple choice, POPE, MME, ANLS.

Definitions follow the reference implementations described in ``docs/evaluation.md``:

| metric                | reference                                                                  |
|-----------------------|----------------------------------------------------------------------------|
| ``normalize_answer``  | GT-Vision-Lab/VQA ``vqaEval.py`` @a013f00 (processPunctuation + processDigitArticle) |
| ``vqa_accuracy``      | same file: leave-one-out ``min(1, matches/3)``; normalised only if the answers disagree  |
| ``exact_match``       | lmms-eval GQA: exact match with ``ignore_case`` and ``ignore_punctuation``  |
| ``yes_no``            | POPE / LLaVA ``eval_pope.py``: first sentence, commas removed, 'No'/'not'/'no' word |
| ``mme_yes_no``        | MME (Otter-style parsing as in lmms-eval ``mme/utils.py``)                   |
| ``anls``              | DocVQA ANLS, threshold 0.5 on the similarity (``1 - NL``)                    |
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

# --- VQAv2 answer processing (official evaluator, master a013f00) -----------------------------------------
# The official table writes most values with a typographic apostrophe (an encoding artefact); we use "'".
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {  # the official ``manualMap``
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# The official list of GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (master a013f00; since 2016):
# ':' and "'" were dropped (contractions such as "don't" must survive) and '{', '}', '-', '!' added. The older
# 07aecec list (; : / ' [ ] " ( ) = + \ _ > < @ ` , ?) is what some third-party copies still carry.
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                                "@", "`", ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official look-"behind" is a look-ahead

# MME's official subtask lists (docs/evaluation.md#mme): folder names as released.
MME_PERCEPTION: tuple[str, ...] = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                                   "landmark", "artwork", "OCR")
MME_COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                                  "code_reasoning")


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop or blank out punctuation, strip periods not before a digit.

    A mark is removed when it touches a space (``"p "`` or ``" p"``) or when the text contains a
    digit,digit pattern anywhere (so ``"1,000"`` -> ``"1000"``); otherwise it becomes a space.
    """
    strip_all = _COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if strip_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call is ``periodStrip.sub("", outText, re.UNICODE)``: the flag lands in ``count``, so at
    # most re.UNICODE (32) periods are stripped. Kept for agreement on pathological answers.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lowercase, number words -> digits, drop a/an/the, expand contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def _clean(s: str) -> str:
    """What the official evaluator does to every answer first: newlines and tabs to spaces, then strip."""
    return s.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(s: str) -> str:
    """Normalise an answer the way the official VQAv2 evaluator normalises a prediction.

    Example: ``"The Two dogs."`` -> ``"2 dogs"``; ``"1,000"`` -> ``"1000"``; ``"3.5"`` stays ``"3.5"``.
    """
    return process_digit_article(process_punctuation(_clean(s)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize_all_answers: bool = False) -> float:
    """VQAv2 accuracy of one prediction: mean over leave-one-out subsets of ``min(1, matches / 3)``.

    As in the official evaluator's current code (GT-Vision-Lab/VQA master, a013f00 "Fixed processing answers
    bug"; docs/evaluation.md#ground-truth-processing): newlines/tabs become spaces and everything is stripped;
    when the human answers are not all identical, the answers *and* the prediction get the full
    normalisation (:func:`normalize_answer`); when they are all identical, neither does (exact comparison).
    With ``normalize_all_answers=True`` the answers and the prediction are always normalised (the
    TextVQA/MMF convention). Fewer than 10 answers are allowed: the mean runs over ``len(answers)``
    subsets, so a single answer always scores 0.

    Raises:
        ValueError: if ``answers`` is empty.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred, gts = _clean(prediction), [_clean(a) for a in answers]
    if normalize_all_answers or len(set(gts)) > 1:
        pred, gts = normalize_answer(pred), [normalize_answer(a) for a in gts]
    hits = [gt == pred for gt in gts]
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)


def _em_normalize(s: str) -> str:
    """Lowercase, delete ``string.punctuation`` and collapse whitespace."""
    return " ".join(s.lower().translate(str.maketrans("", "", string.punctuation)).split())


def exact_match(prediction: str, answer_or_answers: str | Sequence[str]) -> float:
    """GQA-style exact match (case and punctuation ignored, whitespace collapsed); 1.0 if any answer matches."""
    answers = [answer_or_answers] if isinstance(answer_or_answers, str) else list(answer_or_answers)
    pred = _em_normalize(prediction)
    return float(any(_em_normalize(a) == pred for a in answers))


def option_letter(index: int) -> str:
    """``0 -> 'A'``, ``1 -> 'B'``, ..."""
    return string.ascii_uppercase[index]


def extract_choice(prediction: str, options: Sequence[str]) -> str | None:
    """Extract an option letter from a free-form answer (ScienceQA / MMBench style).

    Tried in order: a bare letter (``"A"``, ``"(A)"``, ``"A."``, ``"A)"``, ``"A:"``); a leading letter
    followed by punctuation (``"B. dog"``); ``"answer is (B)"`` / ``"answer: B"``; the text of exactly one
    option (equal after normalisation, else contained as whole words). A leading article ``"A cat"`` is
    not read as a letter. Letters beyond ``len(options)`` are rejected.

    Returns:
        The upper-case letter, or ``None`` when nothing unambiguous is found.
    """
    valid = string.ascii_uppercase[: len(options)]
    text = prediction.strip()
    patterns = (r"^\(?([A-Z])\)?[.:)]?$", r"^\(?([A-Z])[.:)]\s", r"(?i:answer\s+is|answer\s*:)\s*\(?([A-Z])\b")
    for pattern in patterns:
        m = re.search(pattern, text)
        if m and m.group(1) in valid:
            return m.group(1)
    norm = _em_normalize(text)
    opts = [_em_normalize(o) for o in options]
    equal = [i for i, o in enumerate(opts) if o and o == norm]
    if len(equal) == 1:
        return option_letter(equal[0])
    contained = [i for i, o in enumerate(opts) if o and re.search(rf"\b{re.escape(o)}\b", norm)]
    return option_letter(contained[0]) if len(contained) == 1 else None


def multiple_choice_accuracy(prediction: str, options: Sequence[str], answer: str | int) -> float:
    """1.0 if the extracted letter equals ``answer`` (a letter, or a 0-based option index)."""
    gold = option_letter(answer) if isinstance(answer, int) else answer.strip().upper()
    return float(extract_choice(prediction, options) == gold)


def yes_no(prediction: str) -> str | None:
    """Parse a POPE answer like the POPE / LLaVA ``eval_pope.py`` reference.

    Keep the first sentence (up to the first '.'), remove commas, split on spaces; the answer is 'no' if
    one of the words is exactly ``No``, ``not`` or ``no`` (case-sensitive, as in the reference), else 'yes'.
    So ``"Yes, there is no dog."`` parses as 'no' and ``"NO"`` as 'yes', faithfully. The only departure:
    an empty (whitespace-only) prediction gives ``None`` instead of 'yes'.
    """
    text = prediction.strip()
    if not text:
        return None
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 and yes-ratio with 'yes' as the positive class.

    Predictions are parsed with :func:`yes_no`. An unparseable (``None``) prediction is wrong: a false
    negative when the label is 'yes', and neither TN nor FP when it is 'no'. ``yes_ratio`` is the fraction
    of *predicted* yes (the original definition, not lmms-eval's ground-truth ratio; docs/evaluation.md#pope).
    Divisions by zero give 0.0.

    Raises:
        ValueError: on length mismatch, no items, or a label other than yes/no.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_metrics needs at least one item")
    tp = fp = tn = fn = n_yes = 0
    for pred, label in zip(predictions, labels):
        gold = label.strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        parsed = yes_no(pred)
        n_yes += parsed == "yes"
        if gold == "yes":
            tp += parsed == "yes"
            fn += parsed != "yes"
        else:
            fp += parsed == "yes"
            tn += parsed == "no"
    precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
    return {"accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall,
            "f1": _safe_div(2 * precision * recall, precision + recall), "yes_ratio": n_yes / len(labels)}


def mme_yes_no(prediction: str) -> str | None:
    """MME answer parsing (docs/evaluation.md#mme): exact yes/no, single y/n, else yes/no in the first 4 characters."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text)
    if "yes" in text[:4]:
        return "yes"
    return "no" if "no" in text[:4] else None


def mme_score(records: Iterable[Mapping[str, str]]) -> dict:
    """MME scores from per-question records with keys ``subtask``, ``image_id``, ``prediction``, ``answer``.

    Per subtask: ``acc`` = fraction of questions correct, ``acc_plus`` = fraction of images whose questions
    are all correct (MME has two per image), ``score = (acc + acc_plus) * 100`` (max 200). ``perception`` and
    ``cognition`` sum the scores of the subtasks present from :data:`MME_PERCEPTION` / :data:`MME_COGNITION`.

    Returns:
        ``{"subtasks": {name: {"acc", "acc_plus", "score", "n"}}, "perception": float, "cognition": float}``.

    Raises:
        ValueError: for a subtask not in MME's official lists, or no records.
    """
    by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["subtask"] not in MME_PERCEPTION + MME_COGNITION:
            raise ValueError(f"unknown MME subtask {r['subtask']!r}; expected one of {MME_PERCEPTION + MME_COGNITION}")
        correct = mme_yes_no(r["prediction"]) == r["answer"].strip().lower()
        by_image[r["subtask"]][str(r["image_id"])].append(correct)
    if not by_image:
        raise ValueError("mme_score needs at least one record")
    subtasks = {}
    for name, images in by_image.items():
        flat = [c for cs in images.values() for c in cs]
        acc = sum(flat) / len(flat)
        acc_plus = sum(all(cs) for cs in images.values()) / len(images)
        subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100, "n": len(flat)}
    return {"subtasks": subtasks,
            "perception": sum(s["score"] for k, s in subtasks.items() if k in MME_PERCEPTION),
            "cognition": sum(s["score"] for k, s in subtasks.items() if k in MME_COGNITION)}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1), two-row dynamic programme."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (DocVQA).

    Strings are lowercased, stripped and whitespace-collapsed; ``NL = lev(p, a) / max(len(p), len(a))``;
    the score is ``max_a (1 - NL)``, set to 0 when it is below ``threshold``. As in the official DocVQA
    script a similarity of exactly ``threshold`` is kept (the paper's ``NL < tau`` would drop it).

    Raises:
        ValueError: if ``answers`` is empty.
    """
    if not answers:
        raise ValueError("anls needs at least one answer")
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        gold = " ".join(answer.strip().lower().split())
        length = max(len(pred), len(gold))
        best = max(best, 1.0 - (levenshtein(pred, gold) / length if length else 0.0))
    return best if best >= threshold else 0.0
