"""Reading, validating, tokenising and caching preference pairs.

Sources (``data.path``), all read through the datasets library:
    a .json, .jsonl, .parquet or .arrow file; a directory written by ``save_to_disk`` or
    holding data files; or the name of a dataset already in the local Hugging Face cache
    (read offline: nothing is downloaded).

Row layouts (``data.format``, "auto" detects them from the first row):
    explicit        prompt, chosen, rejected: strings
    implicit        chosen, rejected: whole texts (strings) with no ``prompt``, as TRL takes
                    them: the prompt is their longest shared prefix, less a space it ends in
                    (which starts both responses; ``implicit_prompt``)
    conversational  chosen, rejected: message lists ({"role", "content"}) ending in the
                    assistant's reply, as in UltraFeedback-binarized; the prompt is the
                    messages before that reply (or the ``prompt`` string as a user turn when
                    the lists hold the reply alone). Rendered with the tokenizer's chat
                    template.
    pretokenized    prompt_input_ids, chosen_input_ids, rejected_input_ids: token id lists
                    (the prompt with its special tokens; responses without EOS).

Truncation: a prompt longer than ``max_prompt_length`` tokens keeps its first token when it
is the tokenizer's BOS and its last tokens ("left"), or the pair is dropped and counted
("drop"). Responses are then cut so that prompt + response + EOS fits ``seq_length + 1``.

Bad rows (a missing field, an empty response, a message that is not a role/content pair of
strings, identical chosen and rejected, a token id outside the vocabulary) raise a
ValueError naming the file, the row and the field, or with ``skip_invalid`` are skipped and
counted in the report. The tokenised result is cached (``default_cache_dir``), keyed by the
data's content, the tokenizer and these settings, so a restart does not re-tokenise.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

IGNORE_INDEX = -100
FORMATS = ("auto", "explicit", "implicit", "conversational", "pretokenized")
CACHE_VERSION = 2  # 2: the report counts truncation


@dataclass
class PreferenceDataset:
    """Tokenised pairs: tokens and labels [N, 2, S] (chosen, rejected), example ids [N]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    example_ids: torch.Tensor
    source: str
    content_hash: str

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @functools.cached_property
    def lengths(self) -> torch.Tensor:
        """[N, 2] long: the tokens each sequence occupies, prompt and response (what follows
        is padding): one past its last labelled position."""
        positions = torch.arange(self.labels.shape[-1])
        blocks = [torch.where(block != IGNORE_INDEX, positions, -1).amax(-1) + 1
                  for block in self.labels.split(4096)]  # bounded temporary memory
        return torch.cat(blocks) if blocks else torch.zeros(0, 2, dtype=torch.long)

    def subset(self, indices: torch.Tensor) -> PreferenceDataset:
        """The pairs at ``indices``, keeping their example ids (rows of the source)."""
        return PreferenceDataset(self.tokens[indices], self.labels[indices],
                                 self.example_ids[indices], self.source, self.content_hash)


@dataclass
class DataReport:
    """What reading did: rows read, pairs kept, why the others were left out, and what
    truncation cut from the pairs kept (prompts to max_prompt_length, keeping their end;
    responses, EOS included, to what seq_length leaves them)."""

    rows: int = 0
    pairs: int = 0
    dropped_long_prompt: int = 0
    skipped: Counter = field(default_factory=Counter)
    from_cache: bool = False
    truncated_prompts: int = 0
    prompt_tokens_cut: int = 0
    truncated_responses: int = 0
    response_tokens_cut: int = 0

    def __str__(self) -> str:
        text = f"{self.pairs} pairs from {self.rows} rows"
        if self.dropped_long_prompt:
            text += f"; {self.dropped_long_prompt} dropped (prompt longer than max_prompt_length)"
        if self.truncated_prompts:
            text += (f"; {self.truncated_prompts} prompts cut to max_prompt_length "
                     f"({self.prompt_tokens_cut} tokens)")
        if self.truncated_responses:
            text += (f"; {self.truncated_responses} responses cut to fit seq_length "
                     f"({self.response_tokens_cut} tokens)")
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            text += f"; {sum(self.skipped.values())} skipped ({reasons})"
        return text + (" [tokenised cache]" if self.from_cache else "")

    def warnings(self, settings: DataSettings) -> List[str]:
        """One line for each kind of loss or cut that most rows suffered, naming the key."""
        lines = []
        if self.rows and self.dropped_long_prompt > self.rows / 2:
            lines.append(f"{self.dropped_long_prompt} of {self.rows} rows were dropped for a "
                         f"prompt longer than data.max_prompt_length="
                         f"{settings.max_prompt_length} (data.prompt_truncation=drop): raise "
                         "data.max_prompt_length, or set data.prompt_truncation=left")
        skipped = sum(self.skipped.values())
        if self.rows and skipped > self.rows / 2:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            lines.append(f"{skipped} of {self.rows} rows were skipped as bad ({reasons}; "
                         "data.skip_invalid=true): check data.format and the file")
        if self.pairs and self.truncated_prompts > self.pairs / 2:
            lines.append(f"{self.truncated_prompts} of {self.pairs} prompts were longer than "
                         f"data.max_prompt_length={settings.max_prompt_length} tokens and lost "
                         f"their beginning ({self.prompt_tokens_cut} tokens in all; a system "
                         "prompt or first turns among them): raise data.max_prompt_length "
                         "(and data.seq_length)")
        if self.pairs and self.truncated_responses > self.pairs:  # of 2 x pairs responses
            lines.append(f"{self.truncated_responses} of {2 * self.pairs} responses did not "
                         f"fit data.seq_length={settings.seq_length} after their prompt and "
                         f"lost their end ({self.response_tokens_cut} tokens in all): raise "
                         "data.seq_length")
        return lines


class BadRow(ValueError):
    def __init__(self, field_name: str, reason: str, kind: str):
        super().__init__(f"field {field_name!r} {reason}")
        self.kind = kind


# --------------------------------------------------------------------------- sources


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_text(path: Path) -> None:
    """A JSON file is UTF-8 text with something in it; else an error naming file and line."""
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path} has no rows (the file is empty or blank)")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {err.start} of the file)"
                         ) from None


def _locate_bad_json(path: Path) -> Optional[str]:
    """The first line of a JSON Lines file that is not a JSON object, for the error."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{number}: not valid JSON: {err.msg}"
            if not isinstance(row, dict):
                return f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
    return None


DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv")
ROLES = ("system", "user", "assistant", "tool")


def _check_directory(path: Path, key: str = "data.path") -> None:
    """A data directory holds one kind of data file: datasets reads only one kind and would
    leave the others out without a word."""
    kinds: Dict[str, List[str]] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        suffix = file.suffix.lower()
        if suffix in DATA_SUFFIXES:
            kinds.setdefault(".json" if suffix == ".jsonl" else suffix, []).append(
                file.relative_to(path).as_posix())
    if len(kinds) > 1:
        listed = "; ".join(f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                           for names in kinds.values())
        raise ValueError(f"{key}={str(path)!r} mixes data file kinds ({listed}); only one "
                         "kind would be read and the rest left out: keep one format per "
                         f"directory, or point {key} at a file")


def open_source(source: str, split: str = "train", key: str = "data.path"):
    """(datasets.Dataset, content hash, row naming function) for ``source``, the config key
    ``key`` (which errors name)."""
    # local data only: the switch must be set before datasets (and huggingface_hub) read it
    # at import, or a name missing from the cache spends its time trying the Hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets  # after the offline switches above, which it reads at import

    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            _check_text(path)
        try:
            if suffix in (".json", ".jsonl"):
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
            elif suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            elif suffix == ".arrow":
                ds = datasets.Dataset.from_file(str(path))
            else:
                raise ValueError(f"{key}={source!r}: unknown file type {suffix!r}; use "
                                 ".json, .jsonl, .parquet or .arrow")
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - datasets/pyarrow raise many types
            if suffix != ".jsonl":
                raise ValueError(f"{path}: cannot be read as {suffix[1:]}: "
                                 f"{str(err).splitlines()[0] if str(err) else err!r}") from err
            located = _locate_bad_json(path)
            if located:
                raise ValueError(located) from err
            # valid JSON that Arrow cannot type (a field that is a string in one row and a
            # number in another): read it row by row so the bad row can be named
            with open(path, encoding="utf-8") as f:
                ds = [json.loads(line) for line in f if line.strip()]
        return ds, _file_digest(path), lambda i: f"{path}: row {i}"
    if path.is_dir():
        try:
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            else:
                _check_directory(path, key)
                ds = datasets.load_dataset(str(path), split=split)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - e.g. files whose fields differ
            first = str(err).splitlines()[0] if str(err) else repr(err)
            cause = err.__cause__ or err.__context__
            detail = f" ({str(cause).splitlines()[0]})" if cause and str(cause) else ""
            raise ValueError(f"{key}={str(path)!r} cannot be read as one data set: "
                             f"{type(err).__name__}: {first}{detail}") from err
        return ds, ds._fingerprint, lambda i: f"{path}: row {i}"
    # a dataset name: only what the local cache already holds (and where datasets was
    # imported before the switch was set, its own flags say so)
    datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{key}={source!r} is neither a file, a directory (a relative "
                         f"path starts in the working directory, {Path.cwd()}) nor a dataset "
                         f"in the local Hugging Face cache: {err}") from err
    return ds, ds._fingerprint, lambda i: f"{source}[{split}]: row {i}"


# --------------------------------------------------------------------------- rows


def _string(row: dict, name: str, *, allow_empty: bool) -> str:
    if name not in row or row[name] is None:
        raise BadRow(name, "is missing", "missing field")
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(name, f"must be a string, got {type(value).__name__}", "wrong type")
    if not allow_empty and not value:
        raise BadRow(name, "is empty; a response needs at least one token", "empty response")
    return value


def _messages(row: dict, name: str) -> List[Dict[str, str]]:
    if name not in row or row[name] is None:
        raise BadRow(name, "is missing", "missing field")
    value = row[name]
    if not isinstance(value, list) or not value:
        raise BadRow(name, "must be a non-empty list of messages", "wrong type")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise BadRow(f"{name}[{i}]", "must be a message {'role': str, 'content': str}, "
                         f"got {message!r}"[:200], "bad message")
        if message["role"] not in ROLES:
            raise BadRow(f"{name}[{i}].role", f"is {message['role']!r}; a role is one of "
                         f"{', '.join(ROLES)}", "bad role")
    return value


def _detect_format(row: dict) -> str:
    if "chosen_input_ids" in row:
        return "pretokenized"
    if isinstance(row.get("chosen"), list):
        return "conversational"
    if "prompt" not in row and isinstance(row.get("chosen"), str):
        # no prompt column at all (a row of a file with prompts that lacks one is a bad
        # explicit row: the datasets library gives it prompt None)
        return "implicit"
    return "explicit"


def implicit_prompt(chosen: str, rejected: str) -> Tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of an implicit-prompt pair: the prompt is
    the texts' longest shared prefix, less a space it ends in, which then starts both
    responses (TRL's ``extract_prompt`` rule). A text the other one starts with, whole, would
    leave a response empty: BadRow."""
    if chosen == rejected:
        raise BadRow("chosen", "and 'rejected' are identical; such a pair carries no "
                     "preference", "identical responses")
    limit = min(len(chosen), len(rejected))
    end = next((i for i in range(limit) if chosen[i] != rejected[i]), limit)
    if end == limit:
        name = "chosen" if end == len(chosen) else "rejected"
        raise BadRow(name, "is the start of the other response, whole: with no 'prompt' "
                     "field the prompt is their shared beginning, and this response would be "
                     "empty", "empty response")
    if end and chosen[end - 1] == " ":
        end -= 1
    return chosen[:end], chosen[end:], rejected[end:]


def _ids(row: dict, name: str, vocab_size: int) -> List[int]:
    value = row.get(name)
    if value is None:
        raise BadRow(name, "is missing", "missing field")
    if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
        raise BadRow(name, "must be a list of token ids", "wrong type")
    bad = [i for i in value if not 0 <= i < vocab_size]
    if bad:
        raise BadRow(name, f"has token id {bad[0]} outside the vocabulary [0, {vocab_size})",
                     "untokenizable")
    return value


def _pair_ids(row: dict, fmt: str, tokenizer) -> Tuple[List[int], List[int], List[int]]:
    """(prompt ids, chosen response ids, rejected response ids) of one row."""
    if fmt == "pretokenized":
        prompt = _ids(row, "prompt_input_ids", tokenizer.vocab_size)
        chosen = _ids(row, "chosen_input_ids", tokenizer.vocab_size)
        rejected = _ids(row, "rejected_input_ids", tokenizer.vocab_size)
        for name, ids in (("chosen_input_ids", chosen), ("rejected_input_ids", rejected)):
            if not ids:
                raise BadRow(name, "is empty; a response needs at least one token",
                             "empty response")
        return prompt, chosen, rejected
    if fmt == "conversational":
        chosen_msgs, rejected_msgs = _messages(row, "chosen"), _messages(row, "rejected")
        prompt_msgs = chosen_msgs[:-1]
        if rejected_msgs[:-1] != prompt_msgs:
            raise BadRow("rejected", "does not share its prompt turns with 'chosen'",
                         "prompt mismatch")
        if not prompt_msgs:
            if isinstance(row.get("prompt"), list):
                prompt_msgs = _messages(row, "prompt")
            else:
                prompt_msgs = [{"role": "user", "content": _string(row, "prompt",
                                                                   allow_empty=True)}]
        replies = []
        for name, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
            reply = msgs[-1]
            if reply["role"] != "assistant":
                raise BadRow(f"{name}[{len(msgs) - 1}]", "must be the assistant's reply, got "
                             f"role {reply['role']!r}", "bad message")
            if not reply["content"]:
                raise BadRow(name, "ends in an empty reply", "empty response")
            replies.append(reply)
        prompt_text, chosen_text = tokenizer.render_chat(prompt_msgs, replies[0])
        _, rejected_text = tokenizer.render_chat(prompt_msgs, replies[1])
        return (tokenizer.encode_rendered_prompt(prompt_text),
                tokenizer.encode_response(chosen_text), tokenizer.encode_response(rejected_text))
    if fmt == "implicit":
        prompt, chosen, rejected = implicit_prompt(_string(row, "chosen", allow_empty=False),
                                                   _string(row, "rejected", allow_empty=False))
    else:
        prompt = _string(row, "prompt", allow_empty=True)
        chosen = _string(row, "chosen", allow_empty=False)
        rejected = _string(row, "rejected", allow_empty=False)
    return (tokenizer.encode_prompt(prompt), tokenizer.encode_response(chosen),
            tokenizer.encode_response(rejected))


def _truncate_prompt(prompt: List[int], max_prompt_length: int, bos_id: Optional[int]):
    if len(prompt) <= max_prompt_length:
        return prompt
    if bos_id is not None and prompt and prompt[0] == bos_id:
        return prompt[:1] + prompt[len(prompt) - max_prompt_length + 1:]
    return prompt[len(prompt) - max_prompt_length:]


def _sequence(prompt: List[int], response: List[int], eos_id: int, pad_id: int,
              seq_length: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens [S], labels [S], response tokens cut): label t is the token read at t + 1, on
    response tokens.

    The response ends in EOS (a chat template may have written it already).
    """
    if response[-1:] != [eos_id]:
        response = response + [eos_id]
    cut = max(0, len(response) - (seq_length + 1 - len(prompt)))
    response = response[: seq_length + 1 - len(prompt)]
    full = prompt + response
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    tokens[: len(full) - 1] = torch.tensor(full[:-1])
    labels[len(prompt) - 1: len(full) - 1] = torch.tensor(response)
    return tokens, labels, cut


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class DataSettings:
    """The settings the tokenised data depend on: the fields of the run config's data section
    (DataConfig) that tokenising reads, and what the tokenised-data cache and the reference
    cache's fingerprint are keyed by. Checked here, once, for both."""

    format: str = "auto"
    seq_length: int = 1024
    max_prompt_length: int = 512
    prompt_truncation: str = "left"
    skip_invalid: bool = False
    split: str = "train"

    def __post_init__(self):
        for key, value, allowed in (("format", self.format, FORMATS),
                                    ("prompt_truncation", self.prompt_truncation,
                                     ("left", "drop"))):
            if value not in allowed:
                raise ValueError(f"data.{key}={value!r} is not allowed; choose one of "
                                 f"{', '.join(map(repr, allowed))}")


def _cache_file(source: str, content_hash: str, tokenizer, settings: DataSettings,
                cache_dir: Optional[Path]) -> Path:
    key = hashlib.sha256(json.dumps(
        {"v": CACHE_VERSION, "data": content_hash, "tokenizer": tokenizer.fingerprint(),
         "settings": settings.__dict__}, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(source)
    name = path.name if path.exists() else source.replace("/", "__")
    return Path(cache_dir or default_cache_dir()) / f"{name}.tokenized-{key}.pt"


def default_cache_dir() -> Path:
    """Where tokenised data is cached: $ADADPO_CACHE_DIR, else
    $XDG_CACHE_HOME/adadpo_megatron/tokenized (~/.cache by default), as Hugging Face's
    datasets cache its own; never beside the user's data."""
    if os.environ.get("ADADPO_CACHE_DIR"):
        return Path(os.environ["ADADPO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adadpo_megatron" / "tokenized"


def load_preference_data(source: str, tokenizer, settings: DataSettings, *,
                         cache: bool = True, cache_dir: Optional[Path] = None,
                         key: str = "data.path") -> Tuple[PreferenceDataset, DataReport]:
    """Reads, validates, tokenises (or loads the cached tokens of) a preference data set;
    ``key`` is the config key that names ``source``, for errors.

    Raises:
        ValueError: the first bad row, naming file, row and field (unless skip_invalid), a
            source that cannot be read, or no pair left.
    """
    ds, content_hash, where = open_source(source, settings.split, key)
    cache_file = _cache_file(source, content_hash, tokenizer, settings, cache_dir)
    if cache and cache_file.is_file():
        try:
            saved = torch.load(cache_file, weights_only=False)
            report = saved["report"]
            report.from_cache = True
            return PreferenceDataset(saved["tokens"], saved["labels"], saved["example_ids"],
                                     source, content_hash), report
        except Exception as err:  # noqa: BLE001 - a truncated or damaged cache file
            # derived data: tokenise again (and rewrite it) rather than fail the run
            print(f"warning: the tokenised-data cache {cache_file} cannot be read "
                  f"({type(err).__name__}: {err}); tokenising {source} again", flush=True)

    fmt = settings.format
    tokens, labels, ids = [], [], []
    report = DataReport()
    for index, row in enumerate(ds):
        report.rows += 1
        try:
            row_format = _detect_format(row) if fmt == "auto" else fmt
            prompt, chosen, rejected = _pair_ids(row, row_format, tokenizer)
            if len(prompt) > settings.max_prompt_length and \
                    settings.prompt_truncation == "drop":
                report.dropped_long_prompt += 1
                continue
            prompt_cut = max(0, len(prompt) - settings.max_prompt_length)
            prompt = _truncate_prompt(prompt, settings.max_prompt_length, tokenizer.bos_id)
            pair = [_sequence(prompt, r, tokenizer.eos_id, tokenizer.pad_id,
                              settings.seq_length) for r in (chosen, rejected)]
            if torch.equal(pair[0][1], pair[1][1]):
                raise BadRow("chosen", "and 'rejected' are identical (after truncation); "
                             "such a pair carries no preference", "identical responses")
            report.truncated_prompts += prompt_cut > 0
            report.prompt_tokens_cut += prompt_cut
            report.truncated_responses += sum(cut > 0 for _, _, cut in pair)
            report.response_tokens_cut += sum(cut for _, _, cut in pair)
        except BadRow as err:
            if settings.skip_invalid:
                report.skipped[err.kind] += 1
                continue
            raise ValueError(f"{where(index)}: {err} (data.skip_invalid=true skips such "
                             "rows)") from None
        except Exception as err:  # noqa: BLE001 - a tokenizer or template failure
            if settings.skip_invalid:
                report.skipped["untokenizable"] += 1
                continue
            raise ValueError(f"{where(index)}: cannot be tokenised: {err}") from err
        tokens.append(torch.stack([pair[0][0], pair[1][0]]))
        labels.append(torch.stack([pair[0][1], pair[1][1]]))
        ids.append(index)
    if not ids:
        raise ValueError(f"{source}: no pairs left ({report})")
    report.pairs = len(ids)
    dataset = PreferenceDataset(torch.stack(tokens), torch.stack(labels), torch.tensor(ids),
                                source, content_hash)
    if cache:
        _write_cache(cache_file, dataset, report)
    return dataset, report


def _write_cache(cache_file: Path, dataset: PreferenceDataset, report: DataReport) -> None:
    """Atomically; a folder that cannot be written (read-only data) only costs the cache."""
    tmp = cache_file.with_name(cache_file.name + f".tmp{os.getpid()}")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"tokens": dataset.tokens, "labels": dataset.labels,
                    "example_ids": dataset.example_ids, "report": report}, tmp)
        os.replace(tmp, cache_file)
    except OSError as err:
        warnings.warn(f"could not write the tokenised-data cache {cache_file}: {err}; set "
                      "data.cache=false to silence this", stacklevel=3)

