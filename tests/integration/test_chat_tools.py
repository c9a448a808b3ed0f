"""chat with tools: a reply that calls a tool gets its result as a tool turn and goes on."""

import io

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

from llm_stages.chat import chat_loop, model_reply
from llm_stages.models import load_tokenizer
from llm_stages.rollout.builtin_tools import calculator
from llm_stages.rollout.tools import tool_from_callable


class ScriptedModel:
    """generate() returns the next scripted reply (streamed as generate streams), recording the prompts."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies, self.prompts = tokenizer, list(replies), []
        self.generation_config, self.device = GenerationConfig(), torch.device("cpu")

    def generate(self, ids, attention_mask, generation_config, streamer):
        self.prompts.append(self.tokenizer.decode(ids[0]))
        reply = self.tokenizer(self.replies.pop(0), add_special_tokens=False, return_tensors="pt").input_ids
        reply = torch.cat([reply, torch.tensor([[self.tokenizer.eos_token_id]])], 1)
        streamer.put(ids)
        streamer.put(reply[0])
        streamer.end()
        return torch.cat([ids, reply], 1)


def test_chat_calls_a_tool_and_answers_with_its_result():
    tokenizer = load_tokenizer(OmegaConf.create({"name": "tiny"}))
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "123*456"}}\n</tool_call>'
    model = ScriptedModel(tokenizer, [call, "It is 56088.", "Bye."])
    reply = model_reply(model, tokenizer, {"max_new_tokens": 64, "do_sample": False}, [tool_from_callable(calculator)])
    out = io.StringIO()
    chat_loop(reply, io.StringIO("What is 123*456?\nthanks\n"), out)
    text = out.getvalue()
    assert "[calculator -> 56088]" in text and "It is 56088." in text
    assert '"name": "calculator"' in model.prompts[0]  # the tool's schema is in the prompt
    assert "56088<|im_end|>" in model.prompts[1]  # the result came back as a tool turn
    # The next user turn sees the whole exchange: the call, the result, the answer.
    assert "<tool_call>" in model.prompts[2] and "It is 56088." in model.prompts[2]
