"""The zoo's vocabulary, its two synthetic languages and its tasks, with exact-match scoring.

Every sequence is a list of token ids; there is no text processing at training or evaluation time
(the tokenizer saved with each model only exists so that other tools can read the folders). Held-out
data is held out by content, not only by seed: an example's split is a hash of its language-A form,
so no test problem can appear in training, and a problem posed in B has the same split as its A
original (``math`` and ``math_b`` test the same problems).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from workbench.evaluator import EvaluationError

if TYPE_CHECKING:
    import torch

Example = tuple[
    list[int], list[int]
]  # (prompt ids, answer ids); the prompt starts with <bos>, the answer ends with <eos>
Split = Literal["train", "validation", "test"]

# --------------------------------------------------------------------------------------------------
# Vocabulary: specials, shared tags, language A words, language B words (a cipher of A), padding.
# --------------------------------------------------------------------------------------------------

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)
#: Task tags and the answer marker are shared by both languages, like markup around real text.
TAGS = ["<text>", "<a2b>", "<b2a>", "<reverse>", "<sort>", "<count>", "<subject>", "<object>", "<math>", "="]

DIGITS = [str(d) for d in range(10)]
ANIMATE = ["cat", "dog", "bird", "fish", "man", "woman", "child", "king"]
FOOD = ["apple", "bread", "cake", "egg"]
THING = ["book", "ball", "hat", "box", "cup", "stone"]
PLACE = ["house", "tree", "river", "garden", "hill"]
DETERMINERS = ["the", "a", "every", "some", "my"]
ADJ_ANY = ["big", "small", "old"]
ADJ_ANIMATE = ["happy", "sad", "tired"]
ADJ_THING = ["red", "green", "new"]
PREPOSITIONS = ["in", "near", "on", "under"]
#: Each verb selects the nouns it can take as object; this is most of the grammar's structure.
VERBS: dict[str, list[str]] = {
    "eats": FOOD + ["fish"],
    "reads": ["book"],
    "sees": ANIMATE + THING + PLACE,
    "likes": ANIMATE + FOOD + THING,
    "has": FOOD + THING,
    "wants": FOOD + THING,
    "finds": THING + ["egg"],
    "throws": ["ball", "stone", "hat"],
    "chases": ["cat", "dog", "bird", "child", "ball"],
}
FUNCTION = [".", "?", "and", "what", "is", "plus", "minus", "gets", "more", "how", "many", "now"]

WORDS_A: list[str] = list(
    dict.fromkeys(
        DIGITS
        + ANIMATE
        + FOOD
        + THING
        + PLACE
        + DETERMINERS
        + ADJ_ANY
        + ADJ_ANIMATE
        + ADJ_THING
        + PREPOSITIONS
        + list(VERBS)
        + FUNCTION
    )
)
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
_B_RNG = random.Random(20250101)
#: Language B's spelling of each A word (``WORDS_B[k]`` translates ``WORDS_A[k]``): two-syllable pseudo-words.
WORDS_B: list[str] = [
    first + second
    for first, second in _B_RNG.sample([(f, s) for f in _SYLLABLES for s in _SYLLABLES], len(WORDS_A))
]
#: A word ``k`` has id ``A_START + k``; its B translation has id ``B_START + _PERMUTATION[k]``, so the
#: B id range is a shuffled copy of the A range, not A shifted.
_PERMUTATION = list(range(len(WORDS_A)))
_B_RNG.shuffle(_PERMUTATION)

A_START = len(SPECIALS) + len(TAGS)
B_START = A_START + len(WORDS_A)
_B_BY_ID = [WORDS_B[_PERMUTATION.index(p)] for p in range(len(WORDS_A))]
_USED = B_START + len(WORDS_A)
#: Rounded up to a multiple of 16 with unused ``<extra_i>`` tokens (so embedding shapes are friendly).
VOCAB_SIZE = (_USED + 15) // 16 * 16
VOCAB: list[str] = SPECIALS + TAGS + WORDS_A + _B_BY_ID + [f"<extra_{i}>" for i in range(VOCAB_SIZE - _USED)]
TOKEN_ID: dict[str, int] = {token: i for i, token in enumerate(VOCAB)}
if len(TOKEN_ID) != VOCAB_SIZE:  # pragma: no cover - a B spelling equal to an A word
    raise RuntimeError("the zoo vocabulary has duplicate tokens")
#: A word id -> the B word id that spells the same word; everything else maps to itself.
CIPHER: dict[int, int] = {A_START + k: B_START + p for k, p in enumerate(_PERMUTATION)}


def ids(words: str | Sequence[str]) -> list[int]:
    """Token ids of space-separated words (language A words, tags or specials)."""
    tokens = words.split() if isinstance(words, str) else list(words)
    return [TOKEN_ID[t] for t in tokens]


def to_b(tokens: Sequence[int]) -> list[int]:
    """Translate language-A ids into language B (a word-for-word cipher); tags stay as they are."""
    return [CIPHER.get(t, t) for t in tokens]


def decode(tokens: Sequence[int]) -> str:
    return " ".join(VOCAB[t] for t in tokens)


# --------------------------------------------------------------------------------------------------
# Generators of language-A content (every function takes a seeded random.Random).
# --------------------------------------------------------------------------------------------------


def _noun_phrase(rng: random.Random, nouns: Sequence[str]) -> list[str]:
    noun = rng.choice(nouns)
    if rng.random() < 0.15:
        return [rng.choice(DIGITS[2:]), noun]
    adjectives = ADJ_ANY + (ADJ_ANIMATE if noun in ANIMATE else ADJ_THING if noun not in PLACE else [])
    phrase = [rng.choice(DETERMINERS)]
    if rng.random() < 0.4:
        phrase.append(rng.choice(adjectives))
    return phrase + [noun]


def sentence(rng: random.Random) -> list[str]:
    """Subject verb object [preposition place] '.', with the verb selecting its object."""
    verb = rng.choice(list(VERBS))
    words = _noun_phrase(rng, ANIMATE) + [verb] + _noun_phrase(rng, VERBS[verb])
    if rng.random() < 0.35:
        words += [rng.choice(PREPOSITIONS)] + _noun_phrase(rng, PLACE)
    return words + ["."]


def _number(value: int) -> list[str]:
    return list(str(value))


MAX_OPERAND = 9


def math_problem(rng: random.Random) -> tuple[list[str], list[str]]:
    """An addition or subtraction problem, bare or as a tiny word problem, and its answer."""
    x, y = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    form = rng.randrange(3)
    if form == 0:
        question = ["what", "is"] + _number(x) + ["plus"] + _number(y) + ["?"]
        return question, _number(x + y)
    if form == 1:
        x, y = max(x, y), min(x, y)
        question = ["what", "is"] + _number(x) + ["minus"] + _number(y) + ["?"]
        return question, _number(x - y)
    who, what = rng.choice(ANIMATE), rng.choice(FOOD + THING)
    question = (
        ["the", who, "has"]
        + _number(x)
        + [what, "and", "gets"]
        + _number(y)
        + ["more", ".", "how", "many", "now", "?"]
    )
    return question, _number(x + y)


_LIST_WORDS = ANIMATE + FOOD + THING + PLACE + ADJ_ANY + ADJ_THING


def _copy_like(
    rng: random.Random, order: Callable[[list[str]], list[str]], tag: str, pool: Sequence[str]
) -> tuple[list[str], list[str]]:
    words = [rng.choice(pool) for _ in range(rng.randint(3, 6))]
    return [tag] + words + ["="], order(words)


def _count(rng: random.Random) -> tuple[list[str], list[str]]:
    target = rng.choice(_LIST_WORDS)
    others = [w for w in _LIST_WORDS if w != target]
    hits = rng.randint(0, 4)
    words = [target] * hits + [rng.choice(others) for _ in range(rng.randint(max(2, hits), 7) - hits + 1)]
    rng.shuffle(words)
    return ["<count>", target, "?"] + words + ["="], [str(hits)]


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


def _split_of(tokens: Sequence[int]) -> Split:
    bucket = zlib.crc32(",".join(map(str, tokens)).encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


@dataclass(frozen=True)
class Task:
    """A source of (prompt, answer) examples, generated in language A and then posed in ``language``.

    ``language`` is ``A``; ``B`` (prompt and answer ciphered); ``A>B`` or ``B>A`` (translation: one
    side ciphered); or ``mixed`` (code-switched answer: each word at random in A or B, so the words
    of both languages occur in the same contexts, which aligns their representations). ``exact``
    tasks are scored by exact match of the whole answer; text tasks (``exact=False``) have no single
    right answer and are scored per token (accuracy and loss of next-word guesses).
    """

    name: str
    summary: str
    make: Callable[[random.Random], tuple[list[str], list[str]]]
    language: Literal["A", "B", "A>B", "B>A", "mixed"] = "A"
    exact: bool = True

    def _example(self, rng: random.Random, want: Split) -> Example | None:
        prompt_words, answer_words = self.make(rng)
        prompt, answer = [BOS] + ids(prompt_words), ids(answer_words) + [EOS]
        if _split_of(prompt + answer) != want:
            return None
        if self.language in ("B", "B>A"):
            prompt = to_b(prompt)
        if self.language in ("B", "A>B"):
            answer = to_b(answer)
        if self.language == "mixed":
            answer = [CIPHER.get(t, t) if rng.random() < 0.5 else t for t in answer]
        return prompt, answer

    def stream(self, seed: int, split: Split = "train") -> Iterator[Example]:
        """An endless deterministic stream of examples from one split.

        Tasks made by the same function draw the same content for the same seed: ``math_b`` is
        ``math`` ciphered into B, example by example, and ``text_b`` is ``text_a`` translated.
        """
        rng = random.Random(f"{self.make.__name__}:{split}:{seed}")
        while True:
            example = self._example(rng, split)
            if example is not None:
                yield example

    def examples(self, n: int, seed: int = 0, split: Split = "test") -> list[Example]:
        stream = self.stream(seed, split)
        return [next(stream) for _ in range(n)]


# Each function below makes one example's (prompt words, answer words) in language A.


def _text(rng: random.Random) -> tuple[list[str], list[str]]:
    words = sentence(rng)
    if rng.random() < 0.5:
        words += sentence(rng)
    return ["<text>"], words


def _translate(rng: random.Random) -> tuple[list[str], list[str]]:
    words = sentence(rng)
    return ["<a2b>"] + words + ["="], words


def _translate_b2a(rng: random.Random) -> tuple[list[str], list[str]]:
    words = sentence(rng)
    return ["<b2a>"] + words + ["="], words


def _reverse(rng: random.Random) -> tuple[list[str], list[str]]:
    return _copy_like(rng, lambda w: w[::-1], "<reverse>", _LIST_WORDS)


def _sort(rng: random.Random) -> tuple[list[str], list[str]]:
    return _copy_like(rng, sorted, "<sort>", DIGITS)


def _roles(words: Sequence[str]) -> tuple[str, str, str]:
    """Subject, verb and object of a sentence from :func:`sentence`."""
    verb = next(i for i, word in enumerate(words) if word in VERBS)
    return (
        words[verb - 1],
        words[verb],
        next(word for word in words[verb + 1 :] if word in VERBS[words[verb]]),
    )


def _subject(rng: random.Random) -> tuple[list[str], list[str]]:
    words = sentence(rng)
    return ["<subject>"] + words + ["="], [_roles(words)[0]]


def _object(rng: random.Random) -> tuple[list[str], list[str]]:
    words = sentence(rng)
    return ["<object>"] + words + ["="], [_roles(words)[2]]


def _math(rng: random.Random) -> tuple[list[str], list[str]]:
    question, answer = math_problem(rng)
    return ["<math>"] + question + ["="], answer


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("reverse", "repeat a list of 3-6 language-A words backwards", _reverse),
        Task("sort", "sort 3-6 digits in ascending order", _sort),
        Task("count", "how many times a word occurs in a list (0-4)", _count),
        Task("subject", "name the subject of a language-A sentence (who eats, sees, ...)", _subject),
        Task(
            "object", "name the object of a language-A sentence (what the subject eats, sees, ...)", _object
        ),
        Task("math", f"addition and subtraction of numbers 0-{MAX_OPERAND}, posed in language A", _math),
        Task(
            "math_b", "the same arithmetic problems posed (and answered) in language B", _math, language="B"
        ),
        Task("text_a", "generic text in language A (scored per word)", _text, exact=False),
        Task("text_b", "generic text in language B (scored per word)", _text, language="B", exact=False),
        Task(
            "text_mixed",
            "code-switched text: every word at random in A or B (scored per word)",
            _text,
            language="mixed",
            exact=False,
        ),
        Task("translate", "translate a language-A sentence into language B", _translate, language="A>B"),
        Task(
            "translate_b2a", "translate a language-B sentence into language A", _translate_b2a, language="B>A"
        ),
    ]
}
#: The tasks that get a fully fine-tuned expert from the base model.
EXPERT_TASKS = ("subject", "object", "count", "sort")
#: The task of the two models trained from scratch (different initialisations) for OT fusion.
OT_TASK = "reverse"
#: The tasks that get a LoRA adapter on the frozen base.
LORA_TASKS = ("subject", "object", "count")


# --------------------------------------------------------------------------------------------------
# Batches, scoring and the compatibility check
# --------------------------------------------------------------------------------------------------


def collate(examples: Sequence[Example], train_prompt: bool = False) -> dict[str, "torch.Tensor"]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding and, unless
    ``train_prompt``, on the prompt), the usual format of causal-LM fine-tuning."""
    import torch

    length = max(len(p) + len(a) for p, a in examples)
    input_ids = torch.full((len(examples), length), PAD, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        tokens = prompt + answer
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        first = 1 if train_prompt else len(prompt)
        labels[row, first : len(tokens)] = torch.tensor(tokens[first:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def score(
    module: "torch.nn.Module",
    task: Task | str,
    n: int = 256,
    seed: int = 0,
    batch_size: int = 128,
    split: Split = "test",
) -> dict[str, float]:
    """Teacher-forced scores of ``n`` held-out examples: one forward pass per batch.

    ``exact_match`` counts examples whose every answer token is the argmax (equal to greedy
    decoding's exact match, since greedy decoding would follow the same tokens), ``token_accuracy``
    the share of answer tokens guessed, ``loss`` their mean negative log-likelihood. ``accuracy``
    is exact match for exact tasks and token accuracy for text.
    """
    import torch

    task = TASKS[task] if isinstance(task, str) else task
    examples = task.examples(n, seed, split)
    exact = correct_tokens = total_tokens = 0
    total_loss = 0.0
    was_training, threads = module.training, torch.get_num_threads()
    module.eval()
    # Zoo models are so small that several threads spend their time synchronising, and far more so
    # when other processes share the cores (measured: 0.9 s with one thread, 16 s with two).
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = collate(examples[start : start + batch_size])
                logits = (
                    module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    .logits[:, :-1]
                    .float()
                )
                targets = batch["labels"][:, 1:]
                mask = targets != -100
                hits = (logits.argmax(-1) == targets) & mask
                exact += int((hits.sum(1) == mask.sum(1)).sum())
                correct_tokens += int(hits.sum())
                total_tokens += int(mask.sum())
                total_loss += float(
                    torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
                )
    finally:
        module.train(was_training)
        torch.set_num_threads(threads)
    scores = {
        "exact_match": exact / n,
        "token_accuracy": correct_tokens / total_tokens,
        "loss": total_loss / total_tokens,
    }
    scores["accuracy"] = scores["exact_match"] if task.exact else scores["token_accuracy"]
    return scores


def accuracy(
    module: "torch.nn.Module", task: Task | str, n: int = 256, seed: int = 0, batch_size: int = 128
) -> float:
    """The task's headline accuracy on ``n`` held-out (test-split) examples."""
    return score(module, task, n, seed, batch_size)["accuracy"]


def check_compatible(model: Any) -> None:
    """Raise ``EvaluationError`` unless ``model`` is a Llama causal LM with the zoo's vocabulary.

    ``model`` is a :class:`workbench.evaluator.LoadedModel` or a transformers module. Without this
    check a foreign model fails deep inside torch with an index or shape error.
    """
    module = getattr(model, "module", model)
    label = model.label if hasattr(model, "label") else type(module).__name__
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        found = ", ".join(getattr(config, "architectures", None) or [type(module).__name__])
        raise EvaluationError(
            f"{label}: the zoo evaluators need a LlamaForCausalLM (model_type 'llama'), found model_type"
            f" {model_type!r} ({found})."
        )
    sizes = [("config vocab_size", getattr(config, "vocab_size", None))]
    for what, getter in (
        ("input embedding rows", "get_input_embeddings"),
        ("lm_head rows", "get_output_embeddings"),
    ):
        layer = getattr(module, getter)() if hasattr(module, getter) else None
        sizes.append((what, None if layer is None else int(layer.weight.shape[0])))
    for what, size in sizes:
        if size != VOCAB_SIZE:
            raise EvaluationError(
                f"{label}: the zoo evaluators need the zoo's vocabulary of {VOCAB_SIZE} tokens, found {what} {size};"
                " it is not a zoo model or a merge of zoo models."
            )
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        wrong = [token for token, index in TOKEN_ID.items() if vocab.get(token) != index]
        if wrong:
            raise EvaluationError(
                f"{label}: its tokenizer does not match the zoo's vocabulary ({len(wrong)} of {VOCAB_SIZE} "
                f"tokens differ, e.g. {wrong[0]!r} should be id {TOKEN_ID[wrong[0]]}, found "
                f"{vocab.get(wrong[0])})."
            )
