"""Tokenizers: the built-in byte-level one, and Hugging Face tokenizers from a local path.

Both expose the small interface the data pipeline needs:

    encode_prompt(text) -> ids        with the tokenizer's leading special tokens (BOS)
    encode_response(text) -> ids      no special tokens; the pipeline appends eos_id
    render_chat(prompt_messages, response_message) -> (prompt_text, response_text)
    vocab_size, pad_id, eos_id, bos_id (or None), fingerprint()
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

Message = Dict[str, str]

# the files a Hugging Face tokenizer is made of (AutoTokenizer reads no others)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json")


def digest_parts(parts: Iterable[bytes]) -> str:
    """sha256 (16 hex digits) of a sequence of byte strings, each length-prefixed."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:16]


def tokenizer_digest(directory) -> str:
    """The digest of the tokenizer files (TOKENIZER_FILES) in ``directory``, by name and
    content: never the directory's other files, which may be a model's 140 GB of weights."""
    directory = Path(directory)
    parts = []
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            parts += [name.encode(), path.read_bytes()]
    return digest_parts(parts)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus pad, bos and eos. For demos and tests.

    Its chat rendering is ``<|role|>\\ncontent\\n`` per message, the assistant's header ending
    the prompt.
    """

    name = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_prompt(self, text: str) -> List[int]:
        return [self.bos_id] + self.encode(text)

    def encode_response(self, text: str) -> List[int]:
        return self.encode(text)

    def encode_rendered_prompt(self, text: str) -> List[int]:
        return self.encode_prompt(text)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def render_chat(self, prompt: List[Message], response: Message) -> Tuple[str, str]:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in prompt)
        return text + f"<|{response['role']}|>\n", response["content"]

    def fingerprint(self) -> str:
        return f"byte-v1-vocab{self.vocab_size}"


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never from the Hub).

    ``fingerprint``: the digest of its files when already known (a run computes it on one
    rank and broadcasts it), else computed on first use.
    """

    def __init__(self, path: str, fingerprint: Optional[str] = None):
        from transformers import AutoTokenizer  # seconds to import: byte runs need none

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"data.tokenizer={path!r}: no such directory (a local "
                                    "Hugging Face tokenizer directory, or 'byte')")
        self.tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.name = str(self.path)
        self.vocab_size = len(self.tok)
        if self.tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path} has no eos token; responses must end in one")
        self.eos_id = self.tok.eos_token_id
        self.bos_id = self.tok.bos_token_id  # None when the tokenizer has none
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self._fingerprint = fingerprint

    def encode_prompt(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def encode_rendered_prompt(self, text: str) -> List[int]:
        # a chat template writes its own special tokens (BOS included)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_response(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode(ids)

    def render_chat(self, prompt: List[Message], response: Message) -> Tuple[str, str]:
        if not self.tok.chat_template:
            raise ValueError(f"tokenizer {self.path} has no chat template, which "
                             "conversational data needs")
        prompt_text = self.tok.apply_chat_template(prompt, tokenize=False,
                                                   add_generation_prompt=True)
        full = self.tok.apply_chat_template(prompt + [response], tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of "
                             "prompt + response, so the response tokens cannot be located")
        return prompt_text, full[len(prompt_text):]

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = tokenizer_digest(self.path)
        return f"hf-{self._fingerprint}"


def build_tokenizer(spec: str, *, fingerprint: Optional[str] = None):
    """'byte', or the path of a local Hugging Face tokenizer directory (``fingerprint``: its
    ``tokenizer_digest`` when already known)."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec, fingerprint)
