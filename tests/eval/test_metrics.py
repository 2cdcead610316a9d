"""Metrics vs hand-computed values from the published definitions (docs/evaluation.md)."""

from __future__ import annotations

import pytest

from quantlab.eval import metrics as M

# --- normalize_answer (official vqaEval.py processPunctuation + processDigitArticle) ----------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number word -> digit, lowercased
        ("none", "0"),  # manualMap: none -> 0
        ("The dog", "dog"),  # article dropped
        ("a red ball.", "red ball"),  # article dropped, trailing period (not before a digit) stripped
        ("an apple", "apple"),
        ("1,000", "1000"),  # digit,digit anywhere -> punctuation removed, not blanked
        ("3.5", "3.5"),  # period before a digit kept
        ("3.5.", "3.5"),  # ... but the final one is stripped
        ("left/right", "left right"),  # '/' not touching a space -> replaced by a space
        ("hello, world", "hello world"),  # ', ' touches a space -> removed
        ("(a) dog", "dog"),  # '(' -> ' ', ') ' -> removed, then the article 'a' goes
        ("dont", "don't"),  # contractions table
        ("whats", "what's"),
        ("  Yes\n", "yes"),  # \n -> space, strip
        ("hot-dog", "hot dog"),  # '-' is in the official list (since 2016)
    ],
)
def test_normalize_answer(raw, expected):
    assert M.normalize_answer(raw) == expected


# Every mark of the official list, and its neighbours, against values computed by running the official
# vqaEval.py (GT-Vision-Lab/VQA master, a013f00) processPunctuation + processDigitArticle on the same strings.
OFFICIAL_NORMALISED = [
    ("red-ball", "red ball"), ("dont know", "don't know"), ("an apple!", "apple"), ("{x}", "x"),
    ("a;b", "b"),  # ';' -> ' ', then the article 'a' goes
    ("a:b", "a:b"),  # ':' is not in the list (it was in 07aecec)
    ("it's", "it's"),  # nor is "'"
    ("1,000", "1000"), ("1,000 dogs!", "1000 dogs"),  # digit,digit anywhere: every mark is removed
    ("1, 2", "1 2"), ("3.5.", "3.5"), ("(a) dog", "dog"), ("hello, world", "hello world"), ("wait...", "wait"),
    ("x=y", "x y"), ("a+b", "b"), ("c\\d", "c d"), ("_x_", "x"), ("<b>", "b"), ("@home", "home"), ("`q`", "q"),
    ("what?", "what"), ("yes!", "yes"), ("no !", "no"), ("[1]", "1"), ('"quoted"', "quoted"),
    ("left/right", "left right"), ("hot-dog", "hot dog"),
    ("Ten", "10"), ("none", "0"), ("The  Two  cats.", "2 cats"),  # number words, articles, spaces
    ("Im", "im"),  # the table's key is "Im": the lowercased word misses it, as in the official code
    ("isnt", "isn't"), ("a b c", "b c"),
]


@pytest.mark.parametrize(("raw", "expected"), OFFICIAL_NORMALISED)
def test_normalize_answer_matches_the_official_evaluator(raw, expected):
    assert M.normalize_answer(raw) == expected


# vqa_accuracy against values from running the official evaluator's current code (GT-Vision-Lab/VQA master,
# a013f00: answers and prediction are normalised only when the answers disagree) on the same inputs.
@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("red-ball", ["red ball"] * 3 + ["blue"] * 7, 0.9),  # scored 0 with the old punctuation list
        ("dont know", ["don't know"] * 3 + ["no"] * 7, 0.9),  # idem
        ("an apple!", ["apple"] * 3 + ["pear"] * 7, 0.9),  # idem
        ("red ball", ["red-ball"] * 4 + ["red"] * 6, 1.0),
        ("1,000", ["1000"] * 2 + ["1,000"] * 2 + ["many"] * 6, 1.0),  # digit,digit in answers and prediction
        ("Two", ["2"] * 3 + ["3"] * 7, 0.9),
        ("The Two", ["2 "] * 3 + ["two"] * 7, 1.0),  # answers are stripped, then normalised like the prediction
        # all ten answers identical: nothing is normalised, the comparison is exact (after strip)
        ("an apple!", ["apple"] * 10, 0.0),
        ("red-ball", ["red-ball"] * 10, 1.0),
        ("Yes", ["yes"] * 10, 0.0),
        ("two", ["2"] * 10, 0.0),
        ("two", ["two"] * 10, 1.0),
        ("  red\n", ["red"] * 10, 1.0),
    ],
)
def test_vqa_accuracy_matches_the_official_evaluator(prediction, answers, expected):
    assert M.vqa_accuracy(prediction, answers) == pytest.approx(expected)


# --- vqa_accuracy ----------------------------------------------------------------------------------------
# acc = mean over the n answers i of min(1, #{j != i : gt_j == pred} / 3).


def test_vqa_accuracy_two_of_ten_match():
    # 2 matching answers: leaving out a match leaves 1 -> 1/3 (x2); leaving out a non-match leaves 2 -> 2/3 (x8)
    # (2*(1/3) + 8*(2/3)) / 10 = 18/30 = 0.6
    assert M.vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)


def test_vqa_accuracy_three_of_ten_match():
    # (3*(2/3) + 7*1) / 10 = 0.9  (docs/evaluation.md#vqa-accuracy)
    assert M.vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_four_of_ten_match():
    # every 9-subset keeps >= 3 matches -> 1.0
    assert M.vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)


def test_vqa_accuracy_one_and_zero_matches():
    # 1 match: (1*0 + 9*(1/3)) / 10 = 0.3
    assert M.vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert M.vqa_accuracy("4", ["2"] * 3 + ["3"] * 7) == 0.0


def test_vqa_accuracy_number_word_and_article_in_prediction():
    assert M.vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert M.vqa_accuracy("the dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)


def test_vqa_accuracy_disagreeing_answers_are_normalised_with_the_prediction():
    # answers disagree -> 'black/white' becomes 'black white' in answers and prediction alike -> 3 matches
    assert M.vqa_accuracy("black/white", ["black/white"] * 3 + ["gray"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_identical_answers_are_compared_raw():
    # official (a013f00): 10 identical answers are not processed, and neither is the prediction
    assert M.vqa_accuracy("black/white", ["black/white"] * 10) == 1.0
    assert M.vqa_accuracy("two", ["two"] * 10) == 1.0
    assert M.vqa_accuracy("Red.", ["red"] * 10) == 0.0
    # the TextVQA/MMF convention normalises every answer and the prediction
    assert M.vqa_accuracy("Red.", ["red"] * 10, normalize_all_answers=True) == 1.0
    assert M.vqa_accuracy("two", ["2"] * 10, normalize_all_answers=True) == 1.0


def test_vqa_accuracy_fewer_than_ten_answers():
    # n=3, answers yes,yes,no, pred yes: (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert M.vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    assert M.vqa_accuracy("yes", ["yes"]) == 0.0  # a single answer leaves no one to agree with
    with pytest.raises(ValueError, match="at least one"):
        M.vqa_accuracy("yes", [])


# --- exact_match -----------------------------------------------------------------------------------------


def test_exact_match():
    assert M.exact_match("Yes.", "yes") == 1.0
    assert M.exact_match("  the   Left ", "the left") == 1.0
    assert M.exact_match("left side", "left") == 0.0
    assert M.exact_match("red", ["blue", "red"]) == 1.0
    assert M.exact_match("red", ("blue", "green")) == 0.0


# --- multiple choice -------------------------------------------------------------------------------------

ANIMALS = ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    ("pred", "expected"),
    [("A", "A"), ("(B)", "B"), ("C.", "C"), ("B)", "B"), ("B. dog", "B"), ("(C) bird", "C"),
     ("The answer is B.", "B"), ("the answer is (C)", "C"), ("Answer: A", "A"), ("dog", "B"), ("Dog.", "B"),
     ("I think it is a bird", "C"), ("D", None), ("I don't know", None), ("cat or dog", None)],
)
def test_extract_choice(pred, expected):
    assert M.extract_choice(pred, ANIMALS) == expected


def test_extract_choice_article_is_not_a_letter():
    assert M.extract_choice("A blue one", ["red", "blue"]) == "B"


def test_multiple_choice_accuracy():
    assert M.multiple_choice_accuracy("B", ANIMALS, "B") == 1.0
    assert M.multiple_choice_accuracy("bird", ANIMALS, 2) == 1.0
    assert M.multiple_choice_accuracy("A", ANIMALS, 1) == 0.0


# --- POPE ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "expected"),
    [("Yes", "yes"), ("No", "no"), ("no.", "no"), ("There is no dog.", "no"), ("It is not there", "no"),
     ("Yes, there is a dog. No doubt.", "yes"),  # only the first sentence counts
     ("Yes, there is no cat.", "no"),  # reference quirk: 'no' anywhere in the first sentence
     ("NO", "yes"),  # reference quirk: case-sensitive word check
     ("", None), ("   ", None)],
)
def test_yes_no(pred, expected):
    assert M.yes_no(pred) == expected


def test_pope_metrics_confusion_matrix():
    labels = ["yes"] * 6 + ["no"] * 4
    preds = ["Yes", "yes.", "Yes, there is a cat in the image.", "No", "no", "Yes",  # TP=4, FN=2
             "No.", "There is no dog.", "Yes", "not present"]  # TN=3, FP=1
    m = M.pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(0.7)  # (4+3)/10
    assert m["precision"] == pytest.approx(0.8)  # 4/(4+1)
    assert m["recall"] == pytest.approx(2 / 3)  # 4/(4+2)
    assert m["f1"] == pytest.approx(8 / 11)  # 2*(4/5)*(2/3) / (4/5 + 2/3) = (16/15)/(22/15)
    assert m["yes_ratio"] == pytest.approx(0.5)  # 5 predicted yes / 10


def test_pope_metrics_unparseable_and_errors():
    # '' with label yes -> FN; '' with label no -> wrong but neither TN nor FP
    m = M.pope_metrics(["yes", "", ""], ["yes", "yes", "no"])
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(0.5)
    assert M.pope_metrics(["no"], ["yes"])["precision"] == 0.0  # 0/0 -> 0
    with pytest.raises(ValueError, match="labels"):
        M.pope_metrics(["yes"], [])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        M.pope_metrics(["yes"], ["maybe"])


# --- MME -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "expected"),
    [("Yes", "yes"), ("no.", "no"), ("Y", "yes"), ("n", "no"), ("x", None), ("Yes, it is.", "yes"),
     ("Nope", "no"), ("Maybe", None), ("I think yes", None)],  # 'yes' must be in the first 4 characters
)
def test_mme_yes_no(pred, expected):
    assert M.mme_yes_no(pred) == expected


def test_mme_score():
    def rec(subtask, image_id, prediction, answer):
        return {"subtask": subtask, "image_id": image_id, "prediction": prediction, "answer": answer}

    records = [
        rec("existence", "e1", "Yes", "Yes"), rec("existence", "e1", "No", "No"),  # image e1: both right
        rec("existence", "e2", "yes", "Yes"), rec("existence", "e2", "yes", "No"),  # image e2: one right
        rec("count", "c1", "No", "Yes"), rec("count", "c1", "no", "No"),  # one right
        rec("code_reasoning", "k1", "y", "Yes"), rec("code_reasoning", "k1", "Nope, it fails.", "No"),
        rec("OCR", "o1", "Maybe", "Yes"), rec("OCR", "o1", "Maybe", "No"),  # 'other' counts as wrong
    ]
    m = M.mme_score(records)
    ex = m["subtasks"]["existence"]
    assert ex["acc"] == pytest.approx(0.75) and ex["acc_plus"] == pytest.approx(0.5)  # 3/4, 1/2
    assert ex["score"] == pytest.approx(125.0)  # (0.75 + 0.5) * 100
    assert m["subtasks"]["count"]["score"] == pytest.approx(50.0)  # (1/2 + 0) * 100
    assert m["subtasks"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert m["subtasks"]["OCR"]["score"] == 0.0
    assert m["perception"] == pytest.approx(175.0)  # 125 + 50 + 0
    assert m["cognition"] == pytest.approx(200.0)


def test_mme_score_rejects_unknown_subtask():
    assert len(M.MME_PERCEPTION) == 10 and len(M.MME_COGNITION) == 4
    with pytest.raises(ValueError, match="unknown MME subtask 'colour'"):
        M.mme_score([{"subtask": "colour", "image_id": "a", "prediction": "yes", "answer": "yes"}])


# --- ANLS ------------------------------------------------------------------------------------------------


def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("abc", "abc") == 0


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        ("hello", ["hello"], 1.0),
        (" Hello ", ["hello"], 1.0),  # case and surrounding whitespace ignored
        ("helo", ["hello"], 0.8),  # NL = 1/5
        ("kitten", ["sitting"], 4 / 7),  # NL = 3/7
        ("helo", ["world", "hello"], 0.8),  # max over answers
        ("ab", ["ac"], 0.5),  # similarity exactly at the threshold is kept (official script)
        ("abc", ["axy"], 0.0),  # similarity 1/3 < 0.5 -> 0
        ("ab", ["cd"], 0.0),
    ],
)
def test_anls(pred, answers, expected):
    assert M.anls(pred, answers) == pytest.approx(expected)


def test_anls_threshold_and_errors():
    assert M.anls("abc", ["axy"], threshold=0.3) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        M.anls("x", [])
