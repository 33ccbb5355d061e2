"""One tokenizer interface over Hugging Face tokenizer folders and sentencepiece models.

:func:`load_tokenizer` accepts either

* a folder that ``transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)`` can
  load (a Hugging Face checkpoint or tokenizer folder), or
* a sentencepiece model file ending in ``.model``.

and returns a :class:`Tokenizer`. Nothing is ever downloaded. Anything that cannot be loaded raises
:class:`~megatron_renio.errors.UserInputError` with one line naming the path and the reason (the
file, line and column of a malformed JSON file of the folder). A folder's chat template is tried on
a probe user message at load time, so a template that does not render fails there, not at the first
prompt.

Contract shared by both kinds:

* ``encode(text)`` returns token ids without special tokens;
  ``encode(text, add_special_tokens=True)`` adds what the tokenizer itself adds to a whole input
  (e.g. BOS for Llama, nothing for Qwen).
* ``eos_id`` is required (generation stops on it); a tokenizer without one is rejected at load time.
* ``stop_ids`` are the ids that end a generated completion: ``eos_id`` first, then, for a folder,
  the other ids of ``eos_token_id`` in its ``generation_config.json`` (transformers' ``generate``
  stops on every one of them: Qwen3's ``<|endoftext|>`` besides ``<|im_end|>``, Llama-3.1's
  ``<|end_of_text|>`` and ``<|eom_id|>`` besides ``<|eot_id|>``).
* ``pad_id`` is the tokenizer's pad token, or ``eos_id`` when it has none.
* ``vocab_size`` is the true number of ids including added tokens (``len(tokenizer)`` for HF), not
  the padded size of a model's embedding table.
* ``apply_chat_template(messages)`` returns the rendered conversation as ids, or ``None`` when the
  tokenizer has no chat template (callers then fall back to plain text); whatever the template
  raises becomes a :class:`~megatron_renio.errors.UserInputError` naming the folder.
  ``set_template_variables(variables)`` passes ``variables`` to every later rendering (transformers'
  ``apply_chat_template`` keyword arguments, e.g. Qwen3's ``enable_thinking``; none: nothing
  changes); it is refused for a tokenizer without a chat template, for a variable the template
  never reads (a misspelt one would change nothing) and for an argument of transformers'
  ``apply_chat_template`` itself (``add_generation_prompt``, ``max_length``: the template never
  sees it).
* ``fingerprint()`` is a hex digest of the id -> piece table; two tokenizers with the same digest
  map every id to the same piece (used to check that teacher and student share a vocabulary).
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Sequence

from megatron_renio.errors import UserInputError


class Tokenizer(abc.ABC):
    """The interface the trainer uses; see the module docstring for the contract."""

    name_or_path: str
    eos_id: int
    stop_ids: tuple[int, ...]
    pad_id: int
    bos_id: int | None
    vocab_size: int

    def set_template_variables(self, variables: dict) -> None:
        """Render every later prompt with ``variables`` (the module docstring's contract)."""
        if variables:
            raise UserInputError(f"tokenizer {self.name_or_path} has no chat template to pass variables to")

    def add_stop_ids(self, folder: str | os.PathLike) -> None:
        """Also stop on the EOS ids of ``folder``'s generation config (validated against the vocabulary)."""
        self.stop_ids = tuple(dict.fromkeys([*self.stop_ids, *_stop_ids(self.eos_id, str(folder), self.vocab_size)]))

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens (e.g. BOS) only when ``add_special_tokens``."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (EOS, padding) are dropped unless asked for."""

    @abc.abstractmethod
    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int] | None:
        """Ids of ``messages`` rendered through the chat template, or None without a template."""

    @abc.abstractmethod
    def _piece(self, token_id: int) -> str:
        """The vocabulary piece of an id known to be in ``range(vocab_size)``."""

    @abc.abstractmethod
    def _vocabulary(self) -> list[tuple[int, str]]:
        """Every (id, piece) pair of the vocabulary, added tokens included."""

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of ``token_id`` (for showing pivotal tokens).

        Ids outside the tokenizer's vocabulary (a model's embedding table is usually padded beyond
        it) are shown as ``<id N>`` instead of failing.
        """
        token_id = int(token_id)
        if 0 <= token_id < self.vocab_size:
            return self._piece(token_id)
        return f"<id {token_id}>"

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the sorted (id, piece) table; equal digest, equal vocabulary."""
        table = sorted(self._vocabulary())
        return hashlib.sha256(json.dumps(table, ensure_ascii=True).encode("ascii")).hexdigest()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, stop_ids={self.stop_ids}, pad_id={self.pad_id})"
        )


# Files of which a loadable Hugging Face tokenizer folder holds at least one.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


# The JSON files that loading a Hugging Face tokenizer folder reads (when present).
_HF_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "chat_template.json",
    "config.json",
)

# The message a folder's chat template is tried on when the tokenizer loads.
_PROBE_MESSAGES = [{"role": "user", "content": "What is 1 + 1?"}]


# The file beside a tokenizer that holds the model's sampling defaults and every EOS id it stops on.
GENERATION_CONFIG_FILE = "generation_config.json"


def read_generation_config(folder: str | os.PathLike) -> tuple[Path, dict]:
    """(path, contents) of ``folder``'s :data:`GENERATION_CONFIG_FILE`; contents {} when there is none
    (or ``folder`` is a file).

    A file that is not a JSON object raises :class:`UserInputError` naming it.
    """
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return path, {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserInputError(f"{path}: not a readable JSON file") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return path, config


def _stop_ids(eos_id: int, folder: str, vocab_size: int) -> tuple[int, ...]:
    """``eos_id``, then the other ids of ``eos_token_id`` (one id or a list) in ``folder``'s generation config."""
    path, config = read_generation_config(folder)
    ids = config.get("eos_token_id")
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
            raise UserInputError(f"{path}: eos_token_id must be ids in [0, {vocab_size}), got {value!r}")
    return tuple(dict.fromkeys([eos_id, *ids]))


def _refuse_malformed_json(folder: str) -> None:
    """Raise :class:`UserInputError` naming the first of ``folder``'s :data:`_HF_JSON_FILES` that is
    not valid JSON (its line and column), if any."""
    for name in _HF_JSON_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as file:
                json.load(file)
        except json.JSONDecodeError as exc:
            raise UserInputError(
                f"{path} line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg}), "
                f"so the tokenizer in folder {folder} cannot load"
            ) from None
        except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, nested too deeply
            raise UserInputError(
                f"{path}: not a readable JSON file ({type(exc).__name__}), so the tokenizer in folder {folder} "
                "cannot load"
            ) from None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer loaded from a local folder."""

    def __init__(self, path: str):
        import transformers  # imported here: costs seconds and only this kind needs it

        if not any(os.path.exists(os.path.join(path, name)) for name in _HF_TOKENIZER_FILES):
            raise UserInputError(
                f"folder {path} holds no tokenizer files (none of {', '.join(_HF_TOKENIZER_FILES)})"
            )
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
            _refuse_malformed_json(path)
            raise UserInputError(
                f"cannot load a tokenizer from folder {path}: {type(exc).__name__}: {exc}"
            ) from exc
        if tok.eos_token_id is None:
            raise UserInputError(f"tokenizer in folder {path} defines no EOS token (eos_token)")
        self._tok = tok
        self.name_or_path = path
        self.eos_id = int(tok.eos_token_id)
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id
        self.bos_id = int(tok.bos_token_id) if tok.bos_token_id is not None else None
        self.vocab_size = len(tok)
        self.stop_ids = _stop_ids(self.eos_id, path, self.vocab_size)
        self._template_variables: dict = {}
        self.apply_chat_template(_PROBE_MESSAGES)  # a template that cannot render fails now

    def set_template_variables(self, variables: dict) -> None:
        if not self._tok.chat_template:
            return super().set_template_variables(variables)
        # transformers' own arguments never reach the template as variables; the conversation is its messages
        own = {"messages", *inspect.signature(self._tok.apply_chat_template).parameters} - {"kwargs"}
        given = ", ".join(map(repr, (name for name in variables if name in own)))
        if given:
            raise UserInputError(f"{given}: set by apply_chat_template itself, not a chat template variable")
        read = _template_variables_read(self._tok.get_chat_template())
        unread = ", ".join(map(repr, (name for name in variables if name not in read)))
        if unread:
            raise UserInputError(f"tokenizer folder {self.name_or_path}: its chat template never reads {unread} "
                                 f"(it reads {', '.join(sorted(read - own)) or 'no other variable'})")
        self._template_variables = dict(variables)
        self.apply_chat_template(_PROBE_MESSAGES)  # values the template cannot render with fail now

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int] | None:
        if not self._tok.chat_template:
            return None
        # Render to text, then tokenize without extra special tokens: the template writes its own
        # (this is what transformers does internally, independent of its return-type conventions).
        try:
            text = self._tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self._template_variables
            )
        except Exception as exc:  # the template is a program of the folder's: jinja2's errors, raise_exception, ...
            line = getattr(exc, "lineno", None)  # a syntax error's line in the template
            at = f" (template line {line})" if line else ""
            raise UserInputError(
                f"tokenizer folder {self.name_or_path}: its chat template fails{at}: {type(exc).__name__}: {exc}"
            ) from exc
        return self.encode(text, add_special_tokens=False)

    def _piece(self, token_id: int) -> str:
        return str(self._tok.convert_ids_to_tokens(token_id))

    def _vocabulary(self) -> list[tuple[int, str]]:
        return [(int(i), str(piece)) for piece, i in self._tok.get_vocab().items()]


def _template_variables_read(template: str) -> set[str]:
    """The variables that the chat template ``template`` reads from its context (jinja2's undeclared
    names), parsed in the environment transformers renders it in (its ``{% generation %}`` tag, loop
    controls); a plain sandbox with loop controls where that environment is not reachable."""
    import jinja2.ext
    import jinja2.meta
    import jinja2.sandbox

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(template).environment
    except (ImportError, AttributeError):  # a private helper of transformers: another version may lack it
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
    return jinja2.meta.find_undeclared_variables(environment.parse(template))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file. It has no chat template."""

    def __init__(self, path: str):
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on unreadable files
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserInputError(
                f"cannot load sentencepiece model {path}: {message}"
            ) from exc
        if sp.eos_id() < 0:
            raise UserInputError(f"sentencepiece model {path} defines no EOS token (eos_id is -1)")
        self._sp = sp
        self.name_or_path = path
        self.eos_id = int(sp.eos_id())
        self.pad_id = int(sp.pad_id()) if sp.pad_id() >= 0 else self.eos_id
        self.bos_id = int(sp.bos_id()) if sp.bos_id() >= 0 else None
        self.vocab_size = int(sp.get_piece_size())
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(self._sp.encode(text))
        if add_special_tokens and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # sentencepiece's own decode drops control pieces (BOS, EOS, padding); to show them, the
        # ids are decoded in runs between special ids, which are written as their pieces.
        parts: list[str] = []
        run: list[int] = []
        for token_id in (int(i) for i in ids):
            if self._is_special(token_id):
                parts.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    parts.append(self.id_to_piece(token_id))
            else:
                run.append(token_id)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def _is_special(self, token_id: int) -> bool:
        return not 0 <= token_id < self.vocab_size or self._sp.is_control(token_id)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int] | None:
        return None

    def _piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def _vocabulary(self) -> list[tuple[int, str]]:
        return [(i, self._sp.id_to_piece(i)) for i in range(self.vocab_size)]


# The name a sentencepiece model file gets inside a folder (a model checkpoint's tokenizer/ folder);
# a folder that holds it and no Hugging Face tokenizer file is that sentencepiece tokenizer.
SENTENCEPIECE_FILE = "sentencepiece.model"


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer at ``path``: a Hugging Face folder or a sentencepiece ``.model`` file (or a
    folder holding only :data:`SENTENCEPIECE_FILE`, as a model checkpoint stores one).

    Raises :class:`UserInputError` (one line naming ``path``) when the path does not exist, is a
    file of another kind, or cannot be loaded.
    """
    path = os.fspath(path)
    sentencepiece_file = os.path.join(path, SENTENCEPIECE_FILE)
    if os.path.isfile(sentencepiece_file) and not any(
            os.path.exists(os.path.join(path, name)) for name in _HF_TOKENIZER_FILES):
        tokenizer = SentencePieceTokenizer(sentencepiece_file)
        tokenizer.add_stop_ids(path)  # a model checkpoint's tokenizer/ folder: its generation config's EOS ids
        return tokenizer
    if os.path.isdir(path):
        return HFTokenizer(path)
    if os.path.isfile(path):
        if path.endswith(".model"):
            return SentencePieceTokenizer(path)
        raise UserInputError(
            f"tokenizer path {path} is a file but not a sentencepiece .model file; "
            "give a Hugging Face tokenizer folder or a .model file"
        )
    raise UserInputError(f"tokenizer path {path} does not exist")
