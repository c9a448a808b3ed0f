"""Builds the tokenizer shipped in llm_stages/assets/tiny_tokenizer (run once; the output is committed).

    python -m llm_stages.assets.build_tiny_tokenizer [OUT_DIR]

A 1024-token byte-level BPE trained on the demo task's text plus a few paragraphs of English
written below, so no network and nothing outside the repo is needed. Digits are split one per
token (arithmetic), and all 256 bytes are in the alphabet, so any UTF-8 text is encodable.
Special tokens: <|endoftext|> (0, pad), <|im_start|> (1), <|im_end|> (2, eos); ChatML chat template.
Deterministic: running it twice writes byte-identical files. After writing, the result is
reloaded with transformers.AutoTokenizer and checked (see `verify`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llm_stages.data.demo import write_demo_data

OUT_DIR = Path(__file__).parent / "tiny_tokenizer"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}

ENGLISH = """\
The history of a country is written in the lives of its people. Farmers and workers, teachers and
soldiers, writers and merchants all shaped the nation that we know today. In the early years the
new government struggled to pay its debts, to build roads and to keep the peace along the border.
Many families moved west in search of land, and towns grew quickly along the rivers and railways.

A good answer is short and correct. When you are asked a question, read it carefully, think about
what is being asked, and then reply in a clear sentence. If you do not know the answer, say so.
The assistant should be helpful, honest and harmless, and it should explain its reasoning when
that helps the user understand the result.

Science begins with careful observation. A scientist asks a question, makes a guess about the
answer, and then designs an experiment to test that guess. The results are recorded, compared and
shared with others, who may repeat the experiment to check that the findings hold. Over time,
knowledge grows as old ideas are improved or replaced by better ones.

Please write a summary of the following text. Translate this sentence into French. What is the
capital of the United States? How many days are there in a week? Give three tips for staying
healthy: eat a balanced diet, exercise regularly, and get enough sleep every night.

Every morning the small village woke slowly. The baker opened his shop before sunrise, and the smell
of fresh bread drifted down the narrow street. Children walked to school carrying books and lunch
boxes, while their parents went to work in the fields, the market, or the old factory by the river.
In the evening, neighbours sat together outside their houses, talking about the weather, the price
of food, and the news from the city.

Water is one of the most important resources on our planet. Plants need it to grow, animals need it
to drink, and people use it for cooking, cleaning and producing energy. Although most of the Earth
is covered by oceans, only a small part of that water is fresh. Protecting rivers, lakes and
underground sources is therefore a responsibility that belongs to everyone, not only to governments.

Learning a new language takes patience and practice. At first, even simple words seem strange, and
grammar rules feel difficult to remember. Listening to music, watching films and speaking with
friends can make the process easier and more enjoyable. Mistakes are a normal part of learning, so
students should not be afraid to try, to ask for help, and to keep going when progress feels slow.

Computers follow instructions written by programmers. A program is a list of steps that tells the
machine what to do with its input and how to produce an output. Good programs are easy to read,
carefully tested and well documented, because other people will need to understand and change them
later. When something goes wrong, the programmer looks for the error, fixes it, and runs the tests
again until everything works as expected.

The weather changed quickly that afternoon. Dark clouds gathered over the hills, the wind became
stronger, and the first drops of rain began to fall on the dry ground. People hurried home, closing
their windows and bringing their animals inside. By night the storm had passed, and the sky was clear
again, full of bright stars above the quiet, wet fields.

Health depends on many small choices made each day. Drinking enough water, walking instead of
driving, choosing fruit and vegetables, and resting when the body is tired all help people feel
better and live longer. Doctors also recommend regular visits, especially for older patients and
young children, so that problems can be found early and treated before they become serious.

Numbers are everywhere in daily life. We count money at the shop, measure ingredients in the kitchen,
check the time before leaving home, and compare distances when planning a journey. Addition and
subtraction are the first operations that children learn, followed by multiplication and division.
With these simple tools it is possible to solve many practical problems quickly and correctly.

Music has been part of human culture for thousands of years. Different countries developed their
own instruments, songs and dances, often connected to religious ceremonies, family celebrations or
important seasons of the year. Today, thanks to radio and the internet, people can listen to music
from every part of the world, and musicians often combine traditions to create something new.
"""


def corpus_texts() -> list[str]:
    """The training text: the demo data (seed 0) as prose and as ChatML-like turns, plus ENGLISH."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_demo_data(tmp, seed=0)
        corpus = [paths["pt_train"].read_text(encoding="utf-8")]
        for line in paths["sft_train"].read_text(encoding="utf-8").splitlines():
            corpus.append("".join(f"{ROLES[t['from']]}\n{t['value']}\n"
                                  for t in json.loads(line)["conversations"]))
    return corpus + [ENGLISH] * 4


def train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus_texts(), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:  # BPE stops early when the corpus runs out of pairs
        raise RuntimeError(f"trained {tokenizer.get_vocab_size()} tokens, wanted {VOCAB_SIZE}: add text")
    return tokenizer


def build(out_dir: Path = OUT_DIR) -> Path:
    out_dir = Path(out_dir)
    fast = PreTrainedTokenizerFast(tokenizer_object=train(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, model_max_length=2048,
                                   chat_template=CHAT_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)  # transformers 5 writes the template to chat_template.jinja
    verify(out_dir)
    return out_dir


def verify(path: Path = OUT_DIR) -> None:
    """Reload offline with AutoTokenizer and check the properties the framework relies on."""
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == VOCAB_SIZE, len(tok)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token, tok.unk_token) == (0, 2, None, None)
    ids = tok.encode("37 + 45 = 82", add_special_tokens=False)
    assert [t for t in tok.convert_ids_to_tokens(ids) if t.strip("Ġ")][0:2] == ["3", "7"], ids
    assert all(len(tok.encode(d, add_special_tokens=False)) == 1 for d in "0123456789")
    for text in ["The history of a country is written in the lives of its people.", "传染病是指由病原微生物",
                 "  Tabs\tand\nnewlines, émoji 🙂, 1234567890."]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, text
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR))
