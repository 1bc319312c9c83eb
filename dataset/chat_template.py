"""The chat format: special tokens and the ChatML-style Jinja template, defined once.

    <|im_start|>system\nYou are helpful.<|im_end|>\n
    <|im_start|>user\nWhat is 2 + 3?<|im_end|>\n
    <|im_start|>assistant\n2 + 3 = 5. The answer is 5.<|im_end|>\n

A user turn may also be a list of parts, `[{"type": "image"}, {"type": "text", "text": "..."}]`
(transformers' multimodal chat format): an image part renders as `<image>`.

`{% generation %}...{% endgeneration %}` marks what the assistant writes, including its closing
<|im_end|> (the model must learn to stop), but not the header: trl's `assistant_only_loss` and our
`inspect_data.py` read these marks to label only assistant tokens.
"""

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# MiniMind-V's placeholder: one `<image>` in a user turn stands for one image. It is a special token
# (one id, never split), and the VLM stage repeats it once per image patch before the LM sees it.
IMAGE = "<image>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMAGE]

CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- 'You may call these tools:\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson + '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and tools and loop.first %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}"
    "{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content or '' }}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "{{- '\\n<tool_call>' + (call | tojson) + '</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>' }}"
    "{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message.content is string or not message.content %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<image>' }}{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
