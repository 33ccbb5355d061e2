"""load_tokenizer over HF folders and sentencepiece models, built offline in tmp_path."""

import io
import json

import pytest

from megatron_renio.data.tokenizer import load_tokenizer
from megatron_renio.errors import UserInputError

CORPUS = [
    "the student writes a solution and the teacher reads it",
    "compute the sum of two numbers and box the answer",
    "a quick brown fox jumps over the lazy dog",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _save_hf_tokenizer(folder, pad=True, eos=True, chat_template=None, extra_tokens=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    kwargs = {"unk_token": "<unk>", "bos_token": "<s>"}
    if eos:
        kwargs["eos_token"] = "</s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _save_hf_tokenizer(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=60, model_type="bpe",
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    path.write_bytes(buffer.getvalue())
    return str(path)


def test_hf_encode_decode_and_special_ids(hf_dir):
    tok = load_tokenizer(hf_dir)
    ids = tok.encode("the teacher reads the answer")
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == "the teacher reads the answer"
    assert tok.decode(ids + [tok.eos_id]) == "the teacher reads the answer"
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=False).endswith("</s>")
    assert tok.eos_id == tok.encode("</s>")[0]
    assert tok.pad_id == tok.encode("<pad>")[0] != tok.eos_id
    assert tok.name_or_path == hf_dir
    assert tok.id_to_piece(tok.eos_id) == "</s>"
    assert tok.id_to_piece(tok.vocab_size + 5) == f"<id {tok.vocab_size + 5}>"


def test_hf_pad_falls_back_to_eos(tmp_path):
    tok = load_tokenizer(_save_hf_tokenizer(tmp_path, pad=False))
    assert tok.pad_id == tok.eos_id


def test_stop_ids_add_the_generation_config_eos_ids(tmp_path, hf_dir, sp_model):
    """eos_id first, then the other eos_token_id entries of generation_config.json (one id or a list)."""
    assert load_tokenizer(hf_dir).stop_ids == (load_tokenizer(hf_dir).eos_id,)
    assert load_tokenizer(sp_model).stop_ids == (load_tokenizer(sp_model).eos_id,)
    folder = _save_hf_tokenizer(tmp_path / "with_config", extra_tokens=("<|end|>",))
    tok = load_tokenizer(folder)
    end = tok.encode("<|end|>")[0]
    for eos_token_id, expected in (([end, tok.eos_id], (tok.eos_id, end)), (end, (tok.eos_id, end)), (None, (tok.eos_id,))):
        (tmp_path / "with_config" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}))
        assert load_tokenizer(folder).stop_ids == expected


def test_a_sentencepiece_folder_adds_its_generation_config_eos_ids(tmp_path, sp_model):
    """A folder holding a sentencepiece model as a checkpoint stores one (sentencepiece.model) stops on the
    eos_token_id entries of its generation_config.json too; the bare .model file has only its EOS."""
    import shutil

    from megatron_renio.data.tokenizer import SENTENCEPIECE_FILE

    shutil.copy(sp_model, tmp_path / SENTENCEPIECE_FILE)
    eos = load_tokenizer(sp_model).eos_id
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 5]}))
    assert load_tokenizer(str(tmp_path)).stop_ids == (eos, 5)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [999]}))
    with pytest.raises(UserInputError, match="generation_config.json: eos_token_id must be ids in "):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("contents, message", [
    ('{"eos_token_id": [2, 999]}', "eos_token_id must be ids in [0, "),
    ('{"eos_token_id": "</s>"}', "eos_token_id must be ids in [0, "),
    ('{"eos_token_id": [2,', "not a readable JSON file"),
    ('[2, 3]', "expected a JSON object"),
])
def test_bad_generation_config_names_the_file(tmp_path, contents, message):
    folder = _save_hf_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "generation_config.json").write_text(contents)
    with pytest.raises(UserInputError, match="generation_config.json: ") as error:
        load_tokenizer(folder)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_hf_vocab_size_counts_added_tokens(tmp_path, hf_dir):
    base = load_tokenizer(hf_dir)
    grown = load_tokenizer(_save_hf_tokenizer(tmp_path, extra_tokens=("<think>", "</think>")))
    assert grown.vocab_size == base.vocab_size + 2
    assert grown.encode("<think>") == [base.vocab_size]


def test_chat_template_absent_gives_none(hf_dir, sp_model):
    assert load_tokenizer(hf_dir).apply_chat_template([{"role": "user", "content": "hi"}]) is None
    assert load_tokenizer(sp_model).apply_chat_template([{"role": "user", "content": "hi"}]) is None


def test_chat_template_renders_ids(tmp_path):
    tok = load_tokenizer(_save_hf_tokenizer(tmp_path, chat_template=CHAT_TEMPLATE))
    messages = [{"role": "user", "content": "the sum of two numbers"}]
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode("<s>user: the sum of two numbers\nassistant:")
    assert ids[0] == tok.bos_id
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(ids) > len(no_prompt)


THINKING_TEMPLATE = CHAT_TEMPLATE + (  # Qwen3's switch: an empty thinking block when it is turned off
    "{% if add_generation_prompt and enable_thinking is defined and enable_thinking is false %} <think></think>"
    "{% endif %}")


def test_chat_template_variables_reach_every_rendering(tmp_path, hf_dir, sp_model):
    """set_template_variables (--chat-template-kwargs) renders as transformers' apply_chat_template with
    those keyword arguments; a variable the template never reads (also one whose name is in its text),
    one the trainer sets itself, and a tokenizer without a template are refused in one line."""
    from transformers import AutoTokenizer

    folder = _save_hf_tokenizer(tmp_path, chat_template=THINKING_TEMPLATE)
    tok = load_tokenizer(folder)
    messages = [{"role": "user", "content": "the sum of two numbers"}]
    thinking = tok.apply_chat_template(messages)
    tok.set_template_variables({"enable_thinking": False})
    reference = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert reference.endswith("assistant: <think></think>")
    assert tok.apply_chat_template(messages) == tok.encode(reference) != thinking
    for misspelt in ("enable_thinkng", "thinking", "if"):  # the last two are in the template's text
        with pytest.raises(UserInputError, match=f"^tokenizer folder {folder}: its chat template never reads "
                                                 rf"'{misspelt}' \(it reads enable_thinking\)$"):
            tok.set_template_variables({misspelt: False})
    for own in ("add_generation_prompt", "max_length", "messages"):  # transformers' own: never the template's
        with pytest.raises(UserInputError, match=f"^'{own}': set by apply_chat_template itself, not a chat template "
                                                 "variable$"):
            tok.set_template_variables({own: 8})
    assert tok.apply_chat_template(messages) == tok.encode(reference)  # the refused ones changed nothing
    for plain in (hf_dir, sp_model):
        with pytest.raises(UserInputError, match=f"^tokenizer {plain} has no chat template to pass variables to$"):
            load_tokenizer(plain).set_template_variables({"enable_thinking": False})


def test_fingerprint_equal_for_same_vocab_and_differs_otherwise(tmp_path, hf_dir):
    copy = _save_hf_tokenizer(tmp_path / "copy")
    grown = _save_hf_tokenizer(tmp_path / "grown", extra_tokens=("<tool>",))
    fp = load_tokenizer(hf_dir).fingerprint()
    assert len(fp) == 64
    assert load_tokenizer(copy).fingerprint() == fp
    assert load_tokenizer(grown).fingerprint() != fp


def test_sentencepiece_model(sp_model):
    tok = load_tokenizer(sp_model)
    ids = tok.encode("the quick fox")
    assert tok.decode(ids) == "the quick fox"
    assert tok.vocab_size == 60
    assert tok.pad_id == tok.eos_id  # the trained model has no pad piece
    assert tok.encode("the quick fox", add_special_tokens=True) == [tok.bos_id] + ids
    assert tok.decode(ids + [tok.eos_id]) == "the quick fox"
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=False) == "the quick fox</s>"
    assert tok.id_to_piece(tok.eos_id) == "</s>"
    assert len(tok.fingerprint()) == 64


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserInputError, match="nowhere.*does not exist"):
        load_tokenizer(missing)


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserInputError) as err:
        load_tokenizer(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "no tokenizer files" in message and "\n" not in message


def test_folder_with_broken_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserInputError) as err:
        load_tokenizer(str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"cannot load a tokenizer from folder {tmp_path}:")
    assert "\n" not in message


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_malformed_json_file_of_the_folder_is_named(tmp_path, name):
    folder = _save_hf_tokenizer(tmp_path)
    (tmp_path / name).write_text('{\n  "version": 1,\n  oops\n}')
    with pytest.raises(UserInputError) as err:
        load_tokenizer(folder)
    assert str(err.value) == (f"{tmp_path / name} line 3 column 3: malformed JSON (Expecting property name enclosed "
                              f"in double quotes), so the tokenizer in folder {folder} cannot load")
    (tmp_path / name).write_bytes(b'{"version": "\xff"}')  # not UTF-8
    with pytest.raises(UserInputError) as err:
        load_tokenizer(folder)
    assert str(err.value) == (f"{tmp_path / name}: not a readable JSON file (UnicodeDecodeError), so the tokenizer "
                              f"in folder {folder} cannot load")


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}{{ m['content'] }{% endfor %}", " (template line 1): TemplateSyntaxError: unexpected '}'"),
    ("{{ raise_exception('this template needs a system message') }}",
     ": TemplateError: this template needs a system message"),
    ("{{ messages[0]['content'] + 1 }}", ": TypeError: can only concatenate str"),
])
def test_a_chat_template_that_cannot_render_fails_when_the_tokenizer_loads(tmp_path, template, reason):
    folder = _save_hf_tokenizer(tmp_path, chat_template=template)
    with pytest.raises(UserInputError) as err:
        load_tokenizer(folder)
    assert str(err.value).startswith(f"tokenizer folder {folder}: its chat template fails{reason}")


def test_a_chat_template_that_fails_on_one_prompt_names_the_folder(tmp_path):
    template = "{% if 'forbidden' in messages[0]['content'] %}{{ raise_exception('no') }}{% endif %}" + CHAT_TEMPLATE
    tok = load_tokenizer(_save_hf_tokenizer(tmp_path, chat_template=template))  # the probe renders
    message = f"^tokenizer folder {tmp_path}: its chat template fails: TemplateError: no$"
    with pytest.raises(UserInputError, match=message):
        tok.apply_chat_template([{"role": "user", "content": "a forbidden word"}])
    # building a record's prompt: the record (file and line) and the prompt are named too
    from megatron_renio.data.prompts import PromptRecord
    from megatron_renio.data.templates import build_prompt_ids

    record = PromptRecord(problem="a forbidden word", solution=None, answer=None, source="data.jsonl:7")
    with pytest.raises(UserInputError, match=r"^data.jsonl:7 \(student prompt\): tokenizer folder .*: its chat "
                                             r"template fails: TemplateError: no$"):
        build_prompt_ids(tok, record, "math", "student", "opd")


def test_tokenizer_without_eos(tmp_path):
    folder = _save_hf_tokenizer(tmp_path, eos=False)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config.get("eos_token") is None
    with pytest.raises(UserInputError, match="no EOS token"):
        load_tokenizer(folder)


def test_bad_files(tmp_path):
    other = tmp_path / "vocab.bin"
    other.write_bytes(b"\x00")
    with pytest.raises(UserInputError, match="vocab.bin.*not a sentencepiece .model"):
        load_tokenizer(str(other))
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a model")
    with pytest.raises(UserInputError, match=f"cannot load sentencepiece model {broken}"):
        load_tokenizer(str(broken))


def _save_tiny_checkpoint(directory, tokenizer_dir):
    """A tiny-qwen3 model checkpoint at ``directory`` saved with ``tokenizer_dir``; its metadata."""
    from megatron_renio import distributed
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import build_gpt_model
    from megatron_renio.models.checkpoint import read_checkpoint_metadata, save_model_checkpoint
    from megatron_renio.models.presets import get_preset

    distributed.initialize(ParallelConfig(), seed=0)
    try:
        model, info = build_gpt_model(get_preset("tiny-qwen3"), ParallelConfig())
        save_model_checkpoint(model, info, directory, tokenizer_dir=tokenizer_dir)
    finally:
        distributed.destroy()
    return read_checkpoint_metadata(directory)


def test_a_sentencepiece_model_file_travels_in_a_model_checkpoint(sp_model, tmp_path):
    """save_model_checkpoint(tokenizer_dir=x.model) keeps it (as tokenizer/sentencepiece.model) and the
    checkpoint's tokenizer folder loads as the same tokenizer (sft / train with --tokenizer x.model)."""
    saved = load_tokenizer(str(_save_tiny_checkpoint(tmp_path / "ckpt", sp_model).tokenizer_dir))
    original = load_tokenizer(sp_model)
    assert type(saved).__name__ == "SentencePieceTokenizer" and saved.fingerprint() == original.fingerprint()
    assert saved.encode("the answer") == original.encode("the answer")


def test_a_model_checkpoint_keeps_its_tokenizer_folders_generation_config(tmp_path):
    """Without an explicit generation config the saver takes the tokenizer folder's, so a training or
    sft save of a converted model keeps the model's sampling defaults and EOS ids."""
    from megatron_renio.data.arithmetic_task import build_char_tokenizer

    tok = build_char_tokenizer(str(tmp_path / "tok"))
    config = json.dumps({"eos_token_id": [1, 5], "temperature": 0.6})
    (tmp_path / "tok" / "generation_config.json").write_text(config)
    meta = _save_tiny_checkpoint(tmp_path / "out", tok)
    assert meta.generation_config.read_text() == config
    assert load_tokenizer(str(meta.tokenizer_dir)).stop_ids == (1, 5)
