"""Preference data: file formats, row layouts, tokenizers, truncation, bad rows, the cache."""

from __future__ import annotations

import json

import pytest
import torch

from adadpo_megatron.data.preference_data import IGNORE_INDEX, DataSettings, load_preference_data
from adadpo_megatron.data.tokenizers import ByteTokenizer, HFTokenizer

ROWS = [
    {"prompt": "reverse abc:", "chosen": "cba", "rejected": "cab"},
    {"prompt": "reverse hello:", "chosen": "olleh", "rejected": "hello"},
    {"prompt": "reverse xy:", "chosen": "yx", "rejected": "xx"},
]
SETTINGS = DataSettings(seq_length=24, max_prompt_length=16)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def expected_byte_sequence(prompt, response, seq_length=24):
    """The documented layout, built by hand: BOS + prompt, response + EOS, shifted labels."""
    tok = ByteTokenizer()
    full = [tok.bos_id] + list(prompt.encode()) + list(response.encode()) + [tok.eos_id]
    tokens = full[:-1] + [tok.pad_id] * (seq_length - len(full) + 1)
    n_prompt = 1 + len(prompt.encode())
    labels = [IGNORE_INDEX] * (n_prompt - 1) + full[n_prompt:]
    labels += [IGNORE_INDEX] * (seq_length - len(labels))
    return torch.tensor(tokens), torch.tensor(labels)


def test_explicit_rows_follow_the_documented_layout(tmp_path):
    data, report = load_preference_data(write_jsonl(tmp_path / "p.jsonl", ROWS),
                                        ByteTokenizer(), SETTINGS, cache=False)
    assert (report.rows, report.pairs) == (3, 3)
    for i, row in enumerate(ROWS):
        for side, name in enumerate(("chosen", "rejected")):
            tokens, labels = expected_byte_sequence(row["prompt"], row[name])
            assert torch.equal(data.tokens[i, side], tokens)
            assert torch.equal(data.labels[i, side], labels)
    assert data.example_ids.tolist() == [0, 1, 2]


def test_every_file_format_reads_the_same_pairs(tmp_path):
    import datasets

    reference, _ = load_preference_data(write_jsonl(tmp_path / "p.jsonl", ROWS),
                                        ByteTokenizer(), SETTINGS, cache=False)
    ds = datasets.Dataset.from_list(ROWS)
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    sources = [tmp_path / "p.json", tmp_path / "p.parquet", arrow, tmp_path / "saved"]
    for source in sources:
        data, _ = load_preference_data(str(source), ByteTokenizer(), SETTINGS, cache=False)
        assert torch.equal(data.tokens, reference.tokens), source
        assert torch.equal(data.labels, reference.labels), source


def test_pretokenized_rows_equal_their_explicit_encoding(tmp_path):
    tok = ByteTokenizer()
    rows = [{"prompt_input_ids": tok.encode_prompt(r["prompt"]),
             "chosen_input_ids": tok.encode(r["chosen"]),
             "rejected_input_ids": tok.encode(r["rejected"])} for r in ROWS]
    explicit, _ = load_preference_data(write_jsonl(tmp_path / "e.jsonl", ROWS), tok, SETTINGS,
                                       cache=False)
    pretok, _ = load_preference_data(write_jsonl(tmp_path / "t.jsonl", rows), tok, SETTINGS,
                                     cache=False)
    assert torch.equal(pretok.tokens, explicit.tokens)
    assert torch.equal(pretok.labels, explicit.labels)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A character-level Hugging Face tokenizer with BOS/EOS and a chat template, built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz :<>|/!?.,'"))
    vocab = {c: i for i, c in enumerate(["<s>", "</s>", "<pad>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
                          "{{ m['content'] }}{{ eos_token }}{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(path))
    return str(path)


def test_conversational_rows_use_the_chat_template(tmp_path, hf_tokenizer_dir):
    """UltraFeedback-binarized layout: prompt string, chosen/rejected message lists."""
    from transformers import AutoTokenizer

    rows = [{"prompt": r["prompt"],
             "chosen": [{"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["rejected"]}]} for r in ROWS]
    settings = DataSettings(seq_length=64, max_prompt_length=48)
    data, _ = load_preference_data(write_jsonl(tmp_path / "c.jsonl", rows),
                                   HFTokenizer(hf_tokenizer_dir), settings, cache=False)
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    for i, row in enumerate(rows):
        for side, name in enumerate(("chosen", "rejected")):
            # oracle: the whole conversation rendered and tokenised at once
            full = hf.apply_chat_template(row[name], tokenize=True)
            if not isinstance(full, list):
                full = full["input_ids"]
            prompt = hf.apply_chat_template(row[name][:1], tokenize=True,
                                            add_generation_prompt=True)
            if not isinstance(prompt, list):
                prompt = prompt["input_ids"]
            assert full[-1] == hf.eos_token_id and full[0] == hf.bos_token_id
            n = len(full) - 1
            assert data.tokens[i, side, :n].tolist() == full[:-1]
            labels = data.labels[i, side]
            assert labels[len(prompt) - 1: n].tolist() == full[len(prompt):]
            assert (labels[: len(prompt) - 1] == IGNORE_INDEX).all()
            assert (labels[n:] == IGNORE_INDEX).all()


def test_prompt_truncation_left_keeps_bos_and_drop_counts(tmp_path):
    rows = [{"prompt": "a very long prompt indeed:", "chosen": "yes", "rejected": "no"},
            *ROWS]
    settings = DataSettings(seq_length=24, max_prompt_length=14)
    left, report = load_preference_data(write_jsonl(tmp_path / "l.jsonl", rows),
                                        ByteTokenizer(), settings, cache=False)
    assert report.pairs == 4 and report.dropped_long_prompt == 0
    tok = ByteTokenizer()
    assert left.tokens[0, 0, :14].tolist() == [tok.bos_id] + list(b"rompt indeed:")
    assert left.labels[0, 0, 13:17].tolist() == list(b"yes") + [tok.eos_id]
    dropped, report = load_preference_data(
        write_jsonl(tmp_path / "d.jsonl", rows), tok,
        DataSettings(seq_length=24, max_prompt_length=14, prompt_truncation="drop"),
        cache=False)
    # with BOS: the long prompt is 27 tokens and "reverse hello:" 15, over 14
    assert report.dropped_long_prompt == 2
    assert dropped.example_ids.tolist() == [1, 3]


BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, r"row 1: field 'rejected' is missing", "missing field"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, r"row 1: field 'chosen' is empty",
     "empty response"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"},
     r"row 1: field 'chosen' and 'rejected' are identical", "identical responses"),
    ({"prompt_input_ids": [257, 97], "chosen_input_ids": [98], "rejected_input_ids": [999]},
     r"row 1: field 'rejected_input_ids' has token id 999 outside the vocabulary \[0, 259\)",
     "untokenizable"),
]


@pytest.mark.parametrize("bad,message,kind", BAD_ROWS, ids=[b[2] for b in BAD_ROWS])
def test_bad_rows_are_named_or_skipped_and_counted(tmp_path, bad, message, kind):
    good = ROWS[0] if "prompt" in bad else {
        "prompt_input_ids": [257, 97], "chosen_input_ids": [98], "rejected_input_ids": [99]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(ValueError, match=rf"bad.jsonl: {message}"):
        load_preference_data(path, ByteTokenizer(), SETTINGS, cache=False)
    data, report = load_preference_data(
        path, ByteTokenizer(), DataSettings(seq_length=24, max_prompt_length=16,
                                            skip_invalid=True), cache=False)
    assert report.skipped == {kind: 1} and report.pairs == 2
    assert data.example_ids.tolist() == [0, 2]
    assert f"1 skipped (1 {kind})" in str(report)


def test_non_string_message_and_invalid_json_are_named(tmp_path, hf_tokenizer_dir):
    rows = [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": 5}]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ValueError, match=r"m.jsonl: row 0: field 'rejected\[1\]' must be a "
                                         r"message"):
        load_preference_data(path, HFTokenizer(hf_tokenizer_dir), SETTINGS, cache=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_preference_data(str(broken), ByteTokenizer(), SETTINGS, cache=False)


def test_tokenised_data_is_cached(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    monkeypatch.setenv("ADADPO_CACHE_DIR", str(tmp_path / "cache"))
    first, report = load_preference_data(path, ByteTokenizer(), SETTINGS)
    assert not report.from_cache and list((tmp_path / "cache").glob("p.jsonl.tokenized-*.pt"))
    assert not list(tmp_path.glob("*.tokenized-*.pt")), "nothing written beside the data"

    def no_tokenising(self, text):
        raise AssertionError("re-tokenised although the cache was valid")

    monkeypatch.setattr(ByteTokenizer, "encode", no_tokenising)
    again, report = load_preference_data(path, ByteTokenizer(), SETTINGS)
    assert report.from_cache and torch.equal(again.tokens, first.tokens)
    monkeypatch.undo()
    other, report = load_preference_data(path, ByteTokenizer(),
                                         DataSettings(seq_length=20, max_prompt_length=10))
    assert not report.from_cache and other.tokens.shape[-1] == 20


def _train_on_conversations_worker(rank, world, data, tokenizer, out):
    from tests.support.training import run_steps, tiny_config

    config = tiny_config({"data.path": data, "data.tokenizer": tokenizer,
                          "data.seq_length": 64, "data.max_prompt_length": 48})
    history, _ = run_steps(config, steps=2)
    torch.save(history, out)


@pytest.mark.slow
def test_training_step_on_conversational_data_with_a_hf_tokenizer(tmp_path, hf_tokenizer_dir):
    from tests.support.distributed import run_distributed

    rows = [{"chosen": [{"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["rejected"]}]}
            for r in ROWS * 4]
    data = write_jsonl(tmp_path / "conv.jsonl", rows)
    out = tmp_path / "history.pt"
    run_distributed(_train_on_conversations_worker, 2, data, hf_tokenizer_dir, str(out))
    history = torch.load(out, weights_only=False)
    assert history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert history[1]["loss"] != history[0]["loss"]


def test_pair_dataset_items_collate_to_the_chosen_first_layout(tmp_path):
    """What Megatron-LM's loader makes of PairDataset items equals collate()'s batch."""
    from torch.utils.data import default_collate

    from adadpo_megatron.data.micro_batches import PairDataset, collate
    from adadpo_megatron.mcore.forward_step import pairs_first_to_chosen_first

    data, _ = load_preference_data(write_jsonl(tmp_path / "p.jsonl", ROWS), ByteTokenizer(),
                                   SETTINGS, cache=False)
    ref = -torch.rand(len(data), 2)
    indices = torch.tensor([2, 0])
    stacked = default_collate([PairDataset(data, ref)[i] for i in indices.tolist()])
    got = pairs_first_to_chosen_first(stacked)
    want = collate(data, indices)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "example_ids"):
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(got["ref_logps"], torch.cat([ref[indices, 0], ref[indices, 1]]))


def _bad_data_worker(rank, world, data):
    from adadpo_megatron.training.trainer import Trainer
    from tests.support.training import tiny_config

    trainer = Trainer(tiny_config({"data.path": data}))
    try:
        with pytest.raises(ValueError, match=r"bad.jsonl: row 1: field 'rejected' is missing"):
            trainer.setup()
    finally:
        trainer.close()


@pytest.mark.slow
def test_a_bad_row_stops_every_rank_with_the_same_error(tmp_path):
    """Rank 0 reads first; the others get its error instead of waiting for it."""
    from tests.support.distributed import run_distributed

    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "p", "chosen": "a"}])
    run_distributed(_bad_data_worker, 2, path, timeout=120)


def test_an_unwritable_cache_folder_only_costs_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder would go")
    with pytest.warns(UserWarning, match="could not write the tokenised-data cache"):
        data, report = load_preference_data(path, ByteTokenizer(), SETTINGS,
                                            cache_dir=blocker / "cache")
    assert report.pairs == 3 and not report.from_cache


def test_unreadable_sources_are_named(tmp_path):
    """Issue 13: non-UTF-8 bytes, a blank file, an invalid .json and a directory mixing data
    kinds each get an error naming the file; a role outside the chat roles names the row."""
    raw = (json.dumps(ROWS[0]) + "\n").encode() + b'{"prompt": "\xff\xfe", "chosen": "a"}\n'
    bad_bytes = tmp_path / "latin.jsonl"
    bad_bytes.write_bytes(raw)
    with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8 text"):
        load_preference_data(str(bad_bytes), ByteTokenizer(), SETTINGS, cache=False)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"blank.jsonl has no rows"):
        load_preference_data(str(blank), ByteTokenizer(), SETTINGS, cache=False)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a", ')
    with pytest.raises(ValueError, match=r"broken.json: cannot be read as json"):
        load_preference_data(str(broken), ByteTokenizer(), SETTINGS, cache=False)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", ROWS)
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(str(mixed / "b.parquet"))
    with pytest.raises(ValueError, match=r"mixes data file kinds \(a.jsonl; b.parquet\)"):
        load_preference_data(str(mixed), ByteTokenizer(), SETTINGS, cache=False)
    fields = tmp_path / "fields"
    fields.mkdir()
    write_jsonl(fields / "a.jsonl", ROWS)
    write_jsonl(fields / "b.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(ValueError, match=r"cannot be read as one data set"):
        load_preference_data(str(fields), ByteTokenizer(), SETTINGS, cache=False)


def test_a_role_outside_the_chat_roles_names_the_row(tmp_path, hf_tokenizer_dir):
    rows = [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "robot", "content": "q"},
                          {"role": "assistant", "content": "b"}]}]
    path = write_jsonl(tmp_path / "roles.jsonl", rows)
    with pytest.raises(ValueError, match=r"roles.jsonl: row 0: field 'rejected\[0\].role' is "
                                         r"'robot'; a role is one of system, user, assistant"):
        load_preference_data(path, HFTokenizer(hf_tokenizer_dir), SETTINGS, cache=False)


def test_a_damaged_tokenised_cache_is_rebuilt(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADADPO_CACHE_DIR", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    first, _ = load_preference_data(path, ByteTokenizer(), SETTINGS)
    cache = next((tmp_path / "cache").glob("p.jsonl.tokenized-*.pt"))
    cache.write_bytes(cache.read_bytes()[:100])  # truncated by a kill
    again, report = load_preference_data(path, ByteTokenizer(), SETTINGS)
    assert not report.from_cache and torch.equal(again.tokens, first.tokens)
    assert f"the tokenised-data cache {cache} cannot be read" in capsys.readouterr().out


@pytest.mark.slow
def test_a_dataset_name_missing_from_the_cache_fails_fast_offline(tmp_path):
    """Issue 13: the offline switch was set after datasets was imported, so an unknown name
    spent ~23 s trying the Hub."""
    import subprocess
    import sys
    import time

    from tests.support.training import REPO

    code = ("from adadpo_megatron.data.preference_data import open_source\n"
            "try:\n    open_source('no-such-org/no-such-dataset')\n"
            "except ValueError as err:\n    print('refused:', str(err)[:60])\n")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "refused: data.path='no-such-org/no-such-dataset' is neither" in out.stdout, out
    assert time.monotonic() - start < 15


# (chosen, rejected) whole texts: the prompt ends inside a word, at a space, at the start
IMPLICIT = [("Q: what is 2+2? A: 4", "Q: what is 2+2? A: five"),
            ("The sky is blue today.", "The sky is green today."),
            ("yes", "no"),
            ("Translate 'chat': cat", "Translate 'chat': dog")]


def test_implicit_prompts_are_trls_and_read_as_explicit_rows(tmp_path):
    """TRL's implicit-prompt format: the split is trl.data_utils.extract_prompt's (the peer,
    on pairs that differ before either text ends), and the rows then read exactly as the
    explicit rows of that split."""
    from trl.data_utils import extract_prompt

    from adadpo_megatron.data.preference_data import implicit_prompt

    explicit = []
    for chosen, rejected in IMPLICIT:
        theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert implicit_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"],
                                                     theirs["rejected"])
        explicit.append(theirs)
    rows = [{"chosen": c, "rejected": r} for c, r in IMPLICIT]
    data, report = load_preference_data(write_jsonl(tmp_path / "i.jsonl", rows),
                                        ByteTokenizer(), SETTINGS, cache=False)
    want, _ = load_preference_data(write_jsonl(tmp_path / "e.jsonl", explicit),
                                   ByteTokenizer(), SETTINGS, cache=False)
    assert report.pairs == len(IMPLICIT)
    assert torch.equal(data.tokens, want.tokens) and torch.equal(data.labels, want.labels)


@pytest.mark.parametrize("chosen,rejected,message", [
    ("Q: hi A: yes", "Q: hi A: yes, indeed", "'chosen' is the start of the other response"),
    ("same", "same", "'chosen' and 'rejected' are identical"),
])
def test_implicit_pairs_that_leave_a_response_empty_are_named(tmp_path, chosen, rejected,
                                                              message):
    path = write_jsonl(tmp_path / "i.jsonl", [{"chosen": chosen, "rejected": rejected}])
    with pytest.raises(ValueError, match=message) as err:
        load_preference_data(path, ByteTokenizer(), SETTINGS, cache=False)
    assert "i.jsonl" in str(err.value) and "row 0" in str(err.value)


def test_a_row_without_its_prompt_in_a_file_with_prompts_is_a_bad_row(tmp_path):
    """Implicit prompts are read only where the data has no prompt column: a row that lacks
    the prompt of an explicit file (None from the datasets library) is named, not split."""
    rows = [ROWS[0], {"chosen": "The answer is 4", "rejected": "The answer is 5"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ValueError, match=r"mixed.jsonl.*row 1.*field 'prompt' is missing"):
        load_preference_data(path, ByteTokenizer(), SETTINGS, cache=False)


def test_most_rows_dropped_or_skipped_are_warned_about(tmp_path):
    rows = [{"prompt": "p" * 30, "chosen": "a", "rejected": "b"}] * 3 + [ROWS[0]]
    settings = DataSettings(seq_length=24, max_prompt_length=16, prompt_truncation="drop")
    _, report = load_preference_data(write_jsonl(tmp_path / "d.jsonl", rows), ByteTokenizer(),
                                     settings, cache=False)
    assert report.dropped_long_prompt == 3 and report.pairs == 1
    [line] = report.warnings(settings)
    assert line.startswith("3 of 4 rows were dropped for a prompt longer than "
                           "data.max_prompt_length=16")
    bad = [{"prompt": "p", "chosen": "a"}] * 3 + [ROWS[0]]
    skipping = DataSettings(seq_length=24, max_prompt_length=16, skip_invalid=True)
    _, report = load_preference_data(write_jsonl(tmp_path / "s.jsonl", bad), ByteTokenizer(),
                                     skipping, cache=False)
    [line] = report.warnings(skipping)
    assert line.startswith("3 of 4 rows were skipped as bad (3 missing field")


def test_truncation_is_counted_and_a_mostly_cut_set_warned_about(tmp_path):
    """Every cut is counted: prompts over max_prompt_length (byte tokens: BOS + one a byte)
    and responses (+ EOS) over what seq_length leaves them, counted here from the row texts;
    when most pairs lose their prompt's beginning, a warning names the key to raise."""
    rows = [{"prompt": "p" * n, "chosen": "c" * m, "rejected": "r" * (m + 3)}
            for n, m in ((4, 2), (20, 3), (30, 20), (9, 1))]
    settings = DataSettings(seq_length=24, max_prompt_length=8)
    _, report = load_preference_data(write_jsonl(tmp_path / "t.jsonl", rows), ByteTokenizer(),
                                     settings, cache=False)
    prompts = [min(1 + len(r["prompt"]), 8) for r in rows]
    prompt_cuts = [max(0, 1 + len(r["prompt"]) - 8) for r in rows]
    response_cuts = [max(0, len(r[side]) + 1 - (24 + 1 - p))
                     for r, p in zip(rows, prompts, strict=True) for side in ("chosen", "rejected")]
    assert report.truncated_prompts == sum(c > 0 for c in prompt_cuts) == 3
    assert report.prompt_tokens_cut == sum(prompt_cuts)
    assert report.truncated_responses == sum(c > 0 for c in response_cuts) > 0
    assert report.response_tokens_cut == sum(response_cuts)
    assert "3 prompts cut to max_prompt_length" in str(report)
    [warning] = report.warnings(settings)
    assert warning.startswith("3 of 4 prompts were longer than data.max_prompt_length=8")
    assert "raise data.max_prompt_length" in warning


def test_the_length_defaults_are_trls():
    """data.seq_length's default is TRL's DPOConfig.max_length (the peer's own default, read
    from it); max_prompt_length's is TRL's former 512, capped at half the sequence."""
    from trl import DPOConfig

    from adadpo_megatron.training.run_config import DataConfig

    data = DataConfig(path="x.jsonl")
    assert data.seq_length == DPOConfig.__dataclass_fields__["max_length"].default == 1024
    assert data.max_prompt_length == 512
    assert DataConfig(path="x.jsonl", seq_length=64).max_prompt_length == 32


def test_errors_name_the_config_key_that_named_the_source(tmp_path):
    """data.eval_path's source is read as data.path's is; its errors name data.eval_path."""
    missing = str(tmp_path / "held_out.jsonl")
    with pytest.raises(ValueError, match=r"^data.eval_path='.*held_out.jsonl' is neither a "
                                         r"file, a directory \(a relative path starts in the "
                                         r"working directory, .*\) nor a dataset"):
        load_preference_data(missing, ByteTokenizer(), SETTINGS, cache=False,
                             key="data.eval_path")
    with pytest.raises(ValueError, match=r"^data.path='.*held_out.jsonl' is neither"):
        load_preference_data(missing, ByteTokenizer(), SETTINGS, cache=False)
