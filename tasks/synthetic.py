"""RULER-style synthetic long-context tasks over a closed word vocabulary, with exact metrics.

Every prompt is plain text of whitespace-separated words drawn from `VOCAB`, so our word-level
tokenizer reads it as one token per word and any HF tokenizer can read it too. The same builders
produce evaluation examples (context + one question, answer held out) and dense training
sequences (context + many question/answer pairs, loss on every answer word): the evaluation prompt
is exactly the first question of a training sequence, so the shipped LM is evaluated in-distribution.

Prompt formats (`K` key word, `V` number 0-999, `x12` variable, `w` filler word):
- niah_single: filler with one needle "the magic number for K V ." ;
  question "question : what is the magic number for K ? answer : the magic number for K" -> "V".
- niah_multikey: the same with 4-8 needles of distinct keys; one is asked.
- mqar: many records "K V ;" in filler; "question : values ? answer : K" -> "V" (training sequences
  go on "K1 V1 K2 V2 ..." with many keys, as in Zoology's MQAR).
- vt: chains "assign V x3 ." "assign x3 x9 ." ...; "question : which variables hold V ? answer : V"
  -> the chain's 4 variables in order.

Every answer starts right after a word that occurs once earlier in the context directly before the
answer (key, variable), i.e. the tasks are solvable by induction-style lookup; small models learn
that within minutes, while two-step templates ("for K is V") stayed at chance in our first run.
- fwe: "text :" + words with three far more frequent than the rest;
  "question : what are the three most frequent words in the text ? answer :" -> the three, most frequent first.
- passage: "passage 17 : w w ... ." blocks; "question : which passage contains the words : <8 words> ?
  answer : passage" -> "17".
- count: 4-8 keys (4-16 in training) each written 1-6 times in filler; "question : how many times does K
  appear ? answer :" -> "3". Recency-bounded caches undercount.
- fwe_decoy: like fwe, but the three true top words fill only the first 75 % of the text and three decoy
  words are the densest words of the last 25 % (yet rarer overall): a cache that keeps only recent tokens
  names the decoys.
- copy (training only, not in `TASKS`): a random word sequence, later "repeat : w1" -> the rest of it; pure
  induction. The first model, trained without it, never learned key-matched lookup (mqar, niah_multikey)
  in 7 minutes; with it in the mix, mqar took off within ~1,000 steps (not an ablation: see
  artifacts/lm/llama-8k-recall/PROVENANCE.md).

Words added after the first model (`EXTRA_WORDS`) go at the end of `VOCAB`, so earlier ids never move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ----------------------------------------------------------------------------- vocabulary

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
PAD, UNK, BOS, EOS = SPECIAL_TOKENS

TEMPLATE_WORDS = (
    "question answer what is the magic number for values of which variables hold value assign to "
    "are three most frequent words in text passage contains : ; ? ."
).split()

FILLER_WORDS = (
    "apple river stone green house light quiet window garden morning table market winter summer bread "
    "cloud music paper story road friend school water forest mountain city village sky bright dark old "
    "new small large warm cold happy slow fast early late open close walk run read write sing play "
    "dream watch listen travel rain snow wind fire earth ocean island bridge tower castle letter book "
    "chair door floor wall roof street field flower tree leaf branch root seed farm horse bird fish "
    "dog cat mouse lion tiger bear wolf fox deer rabbit horse kitchen bottle glass plate spoon knife "
    "coffee tea milk sugar salt honey butter cheese soup rice corn wheat orange lemon cherry grape "
    "silver golden copper iron wooden soft hard gentle brave clever calm busy lazy proud simple strange "
    "famous empty full heavy narrow wide deep shallow sharp smooth rough sweet bitter fresh ancient "
    "modern distant nearby hidden secret careful honest curious silent loud yellow purple brown white "
    "black pink blue red violet painter farmer doctor sailor teacher baker driver singer writer pilot "
    "artist hunter merchant soldier student engine wheel ladder basket candle mirror pillow blanket "
    "jacket shoe hat ring coin key lamp clock map rope tent boat train plane valley desert meadow lake "
    "harbor canyon cave hill shore"
).split()
FILLER_WORDS = list(dict.fromkeys(FILLER_WORDS))  # drop accidental duplicates, keep order


def _pseudo_words(n: int) -> list[str]:
    """Deterministic two-syllable pseudo-words (e.g. 'bako') used as keys: never English filler."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    syl = [c + v for c in cons for v in vows]
    words = [a + b for a in syl for b in syl]
    step = len(words) // n
    return words[::step][:n]


KEY_WORDS = _pseudo_words(600)
NUMBER_WORDS = [str(i) for i in range(1000)]
VAR_WORDS = [f"x{i}" for i in range(256)]
EXTRA_WORDS = "how many times does appear repeat".split()  # appended: ids of the first model's words stay
VOCAB: list[str] = (SPECIAL_TOKENS + TEMPLATE_WORDS + FILLER_WORDS + KEY_WORDS + NUMBER_WORDS + VAR_WORDS
                    + EXTRA_WORDS)
assert len(VOCAB) == len(set(VOCAB)), "vocabulary groups overlap"
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}

# ----------------------------------------------------------------------------- tasks


@dataclass
class Example:
    id: str
    task: str
    prompt: str
    answer: str
    length: int  # prompt length in word-tokenizer tokens (words), BOS not counted
    chance: float = 0.0  # expected score of an informed random guess (see `TASKS`)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str
    metric: str  # "exact" | "positional" | "set_overlap"
    chance: str


TASKS: dict[str, TaskInfo] = {
    "niah_single": TaskInfo("niah_single", "one needle 'the magic number for K is V' in filler; asked back",
                            "exact", "1/1000 (random number)"),
    "niah_multikey": TaskInfo("niah_multikey", "4-8 needles with distinct keys in filler; one is asked",
                              "exact", "1/#needles (random needle value)"),
    "mqar": TaskInfo("mqar", "many 'K V ;' records in filler; one key's value is asked (many in training)",
                     "exact", "1/#records (random record value)"),
    "vt": TaskInfo("vt", "3 assignment chains of 4 variables; list the variables holding one value",
                   "set_overlap", "4/#variables (random 4 variables)"),
    "fwe": TaskInfo("fwe", "word soup where 3 words are far more frequent; name them",
                    "set_overlap", "3/#distinct words (random 3 words)"),
    "passage": TaskInfo("passage", "numbered passages; which passage contains an 8-word snippet",
                        "exact", "1/#passages (random passage id)"),
    "count": TaskInfo("count", "4-8 keys written 1-6 times each in filler; how often does one appear",
                      "exact", "1/6 (random count)"),
    "fwe_decoy": TaskInfo("fwe_decoy", "fwe whose top words fill the first 75 %; denser decoys in the last 25 %",
                          "set_overlap", "3/#distinct words (random 3 words)"),
}
# Training-only formats (make_training_sequence accepts them; no evaluation examples).
TRAIN_ONLY_TASKS = ("copy",)
MAX_COUNT = 6

NEEDLE_LEN = 8
MIN_LENGTH = 128


def _filler(rng: np.random.Generator, n: int) -> list[str]:
    """Random filler words with a '.' roughly every 10 words."""
    idx = rng.integers(len(FILLER_WORDS), size=n)
    words = [FILLER_WORDS[i] for i in idx]
    for p in np.nonzero(rng.random(n) < 0.1)[0]:
        words[p] = "."
    return words


def _place(rng: np.random.Generator, items: list[list[str]], budget: int) -> list[str]:
    """Lay `items` out in order with random filler gaps so the context is exactly `budget` words."""
    size = sum(len(it) for it in items)
    free = budget - size
    if free < 0:
        raise ValueError(f"context budget {budget} too small for {size} words of task content")
    cuts = np.sort(rng.integers(0, free + 1, size=len(items)))
    gaps = np.diff(np.concatenate([[0], cuts, [free]]))
    filler = _filler(rng, free)
    out, pos = [], 0
    for gap, item in zip(gaps[:-1], items):
        out += filler[pos:pos + gap] + item
        pos += gap
    out += filler[pos:]
    return out


def _niah(rng, length, dense, multikey):
    if dense:
        n = int(rng.integers(max(1, length // 192), max(2, length // 96) + 1))
    else:
        n = int(rng.integers(4, 9)) if multikey else 1
    keys = rng.choice(len(KEY_WORDS), size=n, replace=False)
    vals = rng.integers(1000, size=n)
    needles = [f"the magic number for {KEY_WORDS[k]} {v} .".split() for k, v in zip(keys, vals)]
    order = rng.permutation(n) if dense else [int(rng.integers(n))]
    qa = [((f"question : what is the magic number for {KEY_WORDS[keys[i]]} ? answer : "
            f"the magic number for {KEY_WORDS[keys[i]]}").split(), [str(vals[i])]) for i in order]
    chance = 1 / 1000 if not multikey else 1 / n
    return needles, qa, chance


def _mqar(rng, length, dense):
    n_rec = min(length // 6, 500)
    keys = rng.choice(len(KEY_WORDS), size=n_rec, replace=False)
    vals = rng.integers(1000, size=n_rec)
    records = [[KEY_WORDS[k], str(v), ";"] for k, v in zip(keys, vals)]
    n_q = max(1, min(n_rec, length // 8)) if dense else 1
    asked = rng.permutation(n_rec)[:n_q]
    # one question, then key/value pairs; make_training_sequence closes only the last pair with EOS
    qa = [([KEY_WORDS[keys[i]]], [str(vals[i])]) for i in asked]
    qa[0] = (["question", ":", "values", "?", "answer", ":"] + qa[0][0], qa[0][1])
    return records, qa, 1 / n_rec


def _vt(rng, length, dense):
    n_chain = int(np.clip(length // 128, 3, 48)) if dense else 3
    hops = 4
    names = rng.choice(len(VAR_WORDS), size=(n_chain, hops), replace=False)
    vals = rng.choice(1000, size=n_chain, replace=False)
    chains = []
    for c in range(n_chain):
        src = [str(vals[c])] + [VAR_WORDS[j] for j in names[c, :-1]]
        chains.append([["assign", s, VAR_WORDS[d], "."] for s, d in zip(src, names[c])])
    # interleave chains at random while keeping each chain's statements in order
    slots = rng.permutation(np.repeat(np.arange(n_chain), hops))
    nxt = [0] * n_chain
    items = []
    for c in slots:
        items.append(chains[c][nxt[c]])
        nxt[c] += 1
    order = rng.permutation(n_chain) if dense else [int(rng.integers(n_chain))]
    qa = [(f"question : which variables hold {vals[c]} ? answer : {vals[c]}".split(),
           [VAR_WORDS[j] for j in names[c]]) for c in order]
    return items, qa, hops / (hops * n_chain)


def _fwe(rng, length, dense):
    q = "question : what are the three most frequent words in the text ? answer :".split()
    n = length - len(q) - 2 - (4 if dense else 0)  # dense adds the 3 answer words and EOS
    top = rng.choice(len(FILLER_WORDS), size=3, replace=False)
    counts = [int(round(f * n)) for f in (0.10, 0.08, 0.06)]
    rest_pool = np.setdiff1d(np.arange(len(FILLER_WORDS)), top)
    n_rest = n - sum(counts)
    ids = np.concatenate([np.full(c, t) for c, t in zip(counts, top)] + [rng.choice(rest_pool, size=n_rest)])
    ids = rng.permutation(ids)
    words = ["text", ":"] + [FILLER_WORDS[i] for i in ids]
    n_distinct = len(np.unique(ids))
    return [words], [(q, [FILLER_WORDS[t] for t in top])], 3 / n_distinct


def _passage(rng, length, dense):
    q_len = 20 + 2  # question words + answer + eos
    n_q_target = max(1, length // 100) if dense else 1
    budget = length - (n_q_target * q_len if dense else 20)
    n_p = max(2, budget // 28)
    n_words = budget - 4 * n_p
    # split n_words into n_p passages of at least 10 words
    extra = rng.multinomial(n_words - 10 * n_p, np.ones(n_p) / n_p)
    sizes = 10 + extra
    ids = rng.choice(1000, size=n_p, replace=False)
    passages, bodies = [], []
    for pid, sz in zip(ids, sizes):
        body = _filler(rng, int(sz))
        bodies.append(body)
        passages.append(["passage", str(pid), ":"] + body + ["."])
    asked = rng.choice(n_p, size=min(n_q_target, n_p), replace=False)
    qa = []
    for p in asked:
        start = int(rng.integers(0, len(bodies[p]) - 8 + 1))
        snippet = bodies[p][start:start + 8]
        qa.append((["question", ":", "which", "passage", "contains", "the", "words", ":"] + snippet
                   + ["?", "answer", ":", "passage"], [str(ids[p])]))
    return passages, qa, 1 / n_p


def _count(rng, length, dense):
    n_keys = int(np.clip(length // 256, 4, 16)) if dense else int(rng.integers(4, 9))
    keys = rng.choice(len(KEY_WORDS), size=n_keys, replace=False)
    counts = rng.integers(1, MAX_COUNT + 1, size=n_keys)
    items = [[KEY_WORDS[k]] for k, c in zip(keys, counts) for _ in range(c)]
    items = [items[i] for i in rng.permutation(len(items))]
    order = rng.permutation(n_keys) if dense else [int(rng.integers(n_keys))]
    qa = [(f"question : how many times does {KEY_WORDS[keys[i]]} appear ? answer :".split(), [str(counts[i])])
          for i in order]
    return items, qa, 1 / MAX_COUNT


def _fwe_decoy(rng, length, dense):
    q = "question : what are the three most frequent words in the text ? answer :".split()
    n = length - len(q) - 2 - (4 if dense else 0)
    n_early = int(round(0.75 * n))
    n_late = n - n_early
    pick = rng.choice(len(FILLER_WORDS), size=6, replace=False)
    top, decoy = pick[:3], pick[3:]
    rest_pool = np.setdiff1d(np.arange(len(FILLER_WORDS)), pick)
    early_counts = [int(round(f * n_early)) for f in (0.09, 0.075, 0.06)]
    late_counts = [int(round(0.12 * n_late))] * 3  # overall 3 % each: below the true third word's 4.5 %
    early = np.concatenate([np.full(c, t) for c, t in zip(early_counts, top)]
                           + [rng.choice(rest_pool, size=n_early - sum(early_counts))])
    late = np.concatenate([np.full(c, t) for c, t in zip(late_counts, decoy)]
                          + [rng.choice(rest_pool, size=n_late - sum(late_counts))])
    ids = np.concatenate([rng.permutation(early), rng.permutation(late)])
    words = ["text", ":"] + [FILLER_WORDS[i] for i in ids]
    return [words], [(q, [FILLER_WORDS[t] for t in top])], 3 / len(np.unique(ids))


_COPY_POOL = KEY_WORDS + NUMBER_WORDS + VAR_WORDS + FILLER_WORDS


def _copy(rng, length, dense):
    n_seg = int(np.clip(length // 1024, 1, 4))
    seg_len = int(rng.integers(8, max(9, min(length // (4 * n_seg), 128)) + 1))
    items, qa = [], []
    for _ in range(n_seg):
        seq = [_COPY_POOL[i] for i in rng.integers(len(_COPY_POOL), size=seg_len)]
        items.append(seq)
        qa.append((["repeat", ":", seq[0]], seq[1:]))
    return items, qa, 0.0


def _build(task: str, rng: np.random.Generator, length: int, dense: bool):
    """Returns (context items, [(question words, answer words)], chance)."""
    if task == "niah_single":
        return _niah(rng, length, dense, multikey=False)
    if task == "niah_multikey":
        return _niah(rng, length, dense, multikey=True)
    if task == "mqar":
        return _mqar(rng, length, dense)
    if task == "vt":
        return _vt(rng, length, dense)
    if task == "fwe":
        return _fwe(rng, length, dense)
    if task == "passage":
        return _passage(rng, length, dense)
    if task == "count":
        return _count(rng, length, dense)
    if task == "fwe_decoy":
        return _fwe_decoy(rng, length, dense)
    if task == "copy" and dense:
        return _copy(rng, length, dense)
    raise ValueError(f"unknown synthetic task {task!r}; choose from {sorted(TASKS)}")


def _check(task: str, length: int, training: bool = False) -> None:
    if task not in TASKS and not (training and task in TRAIN_ONLY_TASKS):
        raise ValueError(f"unknown synthetic task {task!r}; choose from {sorted(TASKS)}")
    if length < MIN_LENGTH:
        raise ValueError(f"length_tokens must be >= {MIN_LENGTH}, got {length}")


_SEQUENTIAL = ("passage", "fwe", "fwe_decoy")  # context laid out in order, filler only at the end


def make_words(task: str, length: int, rng: np.random.Generator) -> tuple[list[str], list[str], float]:
    """One evaluation example as (prompt words, answer words, chance); prompt is exactly `length` words."""
    _check(task, length)
    items, qa, chance = _build(task, rng, length, dense=False)
    q, a = qa[0]
    if task in _SEQUENTIAL:
        context = [w for it in items for w in it]
        context = context + _filler(rng, length - len(q) - len(context))
    else:
        context = _place(rng, items, length - len(q))
    return context + q, a, chance


def make_examples(task: str, n: int, length_tokens: int, seed: int = 0) -> list[Example]:
    """`n` seeded examples of `task` whose prompts are exactly `length_tokens` words long."""
    _check(task, length_tokens)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, length_tokens, list(TASKS).index(task), i])
        prompt, answer, chance = make_words(task, length_tokens, rng)
        out.append(Example(id=f"{task}-{length_tokens}-{seed}-{i}", task=task, prompt=" ".join(prompt),
                           answer=" ".join(answer), length=len(prompt), chance=chance))
    return out


def make_training_sequence(task: str, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dense training sequence: BOS + context + many (question, answer, EOS); exactly `length` + 1 ids.

    Returns (ids, target_mask) where target_mask[t] marks positions whose *token* is an answer word
    or the EOS closing it (the loss is on predicting those tokens).
    """
    _check(task, length, training=True)
    items, qa, _ = _build(task, rng, length, dense=True)
    tail, mask_tail = [], []
    for i, (q, a) in enumerate(qa):
        close = [EOS] if task != "mqar" or i == len(qa) - 1 else []
        tail += q + a + close
        mask_tail += [0] * len(q) + [1] * (len(a) + len(close))
    if task in _SEQUENTIAL:
        context = [w for it in items for w in it]
        context = context + _filler(rng, length - len(tail) - len(context))
    else:
        context = _place(rng, items, length - len(tail))
    words = [BOS] + context + tail
    ids = np.fromiter((WORD_TO_ID[w] for w in words), dtype=np.int64, count=len(words))
    mask = np.zeros(len(words), dtype=bool)
    mask[len(words) - len(mask_tail):] = np.asarray(mask_tail, dtype=bool)
    return ids, mask


# ----------------------------------------------------------------------------- scoring

_STRIP = ".,;:?!\"'"


def _clean(prediction: str) -> list[str]:
    """Words of a model's output up to its first EOS, specials dropped, edge punctuation stripped."""
    text = prediction.split(EOS)[0].split("\n")[0]
    words = [w.strip(_STRIP) for w in text.split() if w not in SPECIAL_TOKENS]
    return [w for w in words if w]


def score(task: str, prediction: str, answer: str) -> float:
    """Exact per-example score in [0, 1]; only the first len(answer) predicted words count.

    - exact (niah_single, niah_multikey, passage): 1 iff those words equal the answer words.
    - positional (multi-word ordered answers): fraction of positions i with predicted word i == answer word i.
    - set_overlap (vt, fwe): |set(predicted words) & set(answer words)| / len(answer), order-free.
    Trailing text after the answer is ignored because greedy decoding often runs past it.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {sorted(TASKS)}")
    gold = answer.split()
    pred = _clean(prediction)[: len(gold)]
    metric = TASKS[task].metric
    if metric == "exact":
        return float(pred == gold)
    if metric == "positional":
        return sum(p == g for p, g in zip(pred, gold)) / len(gold)
    return len(set(pred) & set(gold)) / len(gold)


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """Word-level tokenizer over `VOCAB` (one word = one id, BOS prepended); saveable for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(WORD_TO_ID), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, WORD_TO_ID[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, clean_up_tokenization_spaces=False)
