"""Builds the tokenizer shipped in llm_stages/assets/tiny_tokenizer (run once; the output is committed).

    python -m llm_stages.assets.build_tiny_tokenizer

A 1024-token byte-level BPE trained on the demo task's text plus a few paragraphs of English
written below, so no network and nothing outside the repo is needed. Digits are split one per
token (arithmetic), and all 256 bytes are in the alphabet, so any UTF-8 text is encodable.
Deterministic: running it twice writes identical files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llm_stages.data.demo import write_demo_data

OUT_DIR = Path(__file__).parent / "tiny_tokenizer"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

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
"""


def build(out_dir: Path = OUT_DIR) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_demo_data(tmp, seed=0)
        corpus = [paths["pt_train"].read_text(encoding="utf-8")]
        for line in paths["sft_train"].read_text(encoding="utf-8").splitlines():
            corpus += [turn["value"] for turn in json.loads(line)["conversations"]]
    corpus += [ENGLISH] * 4

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=2048, chat_template=CHAT_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build())
