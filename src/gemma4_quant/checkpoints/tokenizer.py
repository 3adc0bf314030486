"""The tiny checkpoints' tokenizer: Gemma's special-token ids (pad 0, eos 1, bos 2), Gemma
4's image / audio / video tokens (under their names in Google's tokenizer_config.json:
``boi_token`` ``<|image>`` ...), a deterministic byte-level BPE for the rest, Gemma's chat
template. transformers' Gemma4Processor reads the multimodal tokens from the tokenizer
(``tokenizer.image_token_id``, ``boi_token``, ...), and the config's ``image_token_id``
... must be the same ids."""

from __future__ import annotations

from pathlib import Path

from .files import write_json

# Gemma 4's multimodal tokens by their tokenizer_config.json names (Google's spelling).
MULTIMODAL_TOKENS = {
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}
VIDEO_TOKEN = "<|video|>"  # an extra special token in Google's tokenizer_config.json
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    *MULTIMODAL_TOKENS.values(),
    VIDEO_TOKEN,
]
PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 5
# The tiny config's max_position_embeddings.
MODEL_MAX_LENGTH = 8192
# Content is a string, or a list of parts as Gemma 4's own template takes them: an image
# part becomes the image token (vLLM and transformers' processor expand it to the image's
# soft tokens), video and audio parts likewise.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% elif item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'video' %}<|video|>"
    "{% elif item['type'] == 'audio' %}<|audio|>{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses)."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_CORPUS = (
    "the of and to in is you that it he was for on are as with his they at be this "
    "have from or one had by word but not what all were we when your can said there "
    "use an each which she do how their if will up other about out many then them "
    "these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part hello world model user question answer "
    "good morning quick brown fox jumps over lazy dog tiny gemma expert router"
).split()


def _train_bpe_merges(n_merges: int) -> list[tuple[str, str]]:
    """A deterministic byte-level BPE over a fixed word list (Zipf-like weights).

    Written out instead of using tokenizers' trainer so the vocabulary does not
    depend on the tokenizers version.
    """
    table = _bytes_to_unicode()
    words = {
        tuple(table[b] for b in (" " + w).encode()): len(_CORPUS) - rank
        for rank, w in enumerate(_CORPUS)
    }
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        counts: dict[tuple[str, str], int] = {}
        for word, freq in words.items():
            for pair in zip(word, word[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + freq
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        merged = {}
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = freq
        words = merged
    # Pad with merges of frequent single bytes if the corpus ran out of pairs.
    filler = iter((a, b) for a in "etaoinsrhl" for b in "etaoinsrhl")
    while len(merges) < n_merges:
        pair = next(filler)
        if pair not in merges and pair[0] + pair[1] not in {a + b for a, b in merges}:
            merges.append(pair)
    return merges


def token_id(token: str) -> int:
    """The id of one of ``SPECIAL_TOKENS`` (they come first in the vocabulary)."""
    return SPECIAL_TOKENS.index(token)


def write_tokenizer(
    out_dir: Path, vocab_size: int, model_max_length: int = MODEL_MAX_LENGTH
) -> None:
    """tokenizer.json (byte-level BPE, vocab == vocab_size), its config and
    generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    table = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[table[b]] = len(vocab)
    merges = _train_bpe_merges(vocab_size - len(vocab))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(out_dir / "tokenizer.json"))

    special = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        **MULTIMODAL_TOKENS,
        "extra_special_tokens": [VIDEO_TOKEN],
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(out_dir / "tokenizer_config.json", tok_cfg)
    write_json(out_dir / "special_tokens_map.json", special)
    write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": BOS_ID,
            "eos_token_id": [EOS_ID, END_OF_TURN_ID],
            "pad_token_id": PAD_ID,
        },
    )
