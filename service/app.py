"""The Gradio chat UI, mounted with the OpenAI-compatible routes on one FastAPI server."""
from __future__ import annotations

import html
import logging
import os

import gradio as gr

from pipeline.errors import UserError
from pipeline.prompt import cited_numbers
from service.engine import Engine, GenerationSettings

log = logging.getLogger("service.app")
TITLE = "alignrag: aligned, retrieval-augmented chat"


def history_pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """Chatbot messages -> (question, answer) turns, skipping incomplete ones."""
    pairs, pending = [], None
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else message.content
        role = message.get("role") if isinstance(message, dict) else message.role
        text = content if isinstance(content, str) else " ".join(
            part.get("text", "") for part in content if isinstance(part, dict))
        if role == "user":
            pending = text
        elif pending is not None:
            pairs.append((pending, text))
            pending = None
    return pairs


def sources_markdown(passages, answer: str = "") -> str:
    if not passages:
        return "_No passages retrieved (retrieval is off, or nothing matched)._"
    cited = set(cited_numbers(answer))
    blocks = []
    for number, p in enumerate(passages, 1):
        mark = " ✅ cited" if number in cited else ""
        text = html.escape(" ".join(p.text.split()))
        blocks.append(f"**[{number}] {html.escape(p.title)}**{mark}  \n"
                      f"<small>{html.escape(p.headers)} · {p.source} · score {p.score:.3f}</small>\n\n"
                      f"> {text}")
    return "\n\n".join(blocks)


def build_ui(engine: Engine, default_variant: str = "base") -> gr.Blocks:
    variants = engine.variants() or ["base"]
    default_variant = default_variant if default_variant in variants else variants[0]

    def respond(message, chat, variant, use_retrieval, temperature, top_p, max_new_tokens,
                repetition_penalty):
        chat = list(chat or [])
        history = history_pairs(chat)
        chat.append({"role": "user", "content": message})
        chat.append({"role": "assistant", "content": ""})
        settings = GenerationSettings(temperature, top_p, int(max_new_tokens), repetition_penalty)
        try:
            for reply in engine.stream(message, history=history, variant=variant,
                                       use_retrieval=use_retrieval, settings=settings):
                chat[-1] = {"role": "assistant", "content": reply.text}
                yield chat, sources_markdown(reply.passages, reply.text), ""
        except UserError as err:
            chat[-1] = {"role": "assistant", "content": f"⚠️ {err}"}
            yield chat, "", ""
        except Exception as err:  # one failing request must not take the server down
            log.exception("chat request failed")
            chat[-1] = {"role": "assistant", "content": f"⚠️ Something went wrong: {err}"}
            yield chat, "", ""

    def compare(question, left, right, use_retrieval):
        outputs = []
        for variant in (left, right):
            try:
                outputs.append(engine.answer(question, variant=variant, use_retrieval=use_retrieval).text)
            except UserError as err:
                outputs.append(f"⚠️ {err}")
        return outputs[0], outputs[1]

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE}\nAnswers come from the indexed documents; "
                    "numbers like [1] point at the sources on the right.")
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot")
                    with gr.Row():
                        message = gr.Textbox(placeholder="Ask about the documents…", show_label=False,
                                             scale=5, elem_id="message")
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    clear = gr.Button("Clear conversation")
                with gr.Column(scale=2):
                    variant = gr.Dropdown(variants, value=default_variant, label="Model variant")
                    use_retrieval = gr.Checkbox(True, label="Retrieve passages")
                    with gr.Accordion("Generation settings", open=False):
                        temperature = gr.Slider(0.0, 1.5, 0.0, step=0.05, label="Temperature (0 = greedy)")
                        top_p = gr.Slider(0.1, 1.0, 0.9, step=0.05, label="Top-p")
                        max_new = gr.Slider(16, 512, 160, step=16, label="Max new tokens")
                        repetition = gr.Slider(1.0, 2.0, 1.1, step=0.05, label="Repetition penalty")
                    sources = gr.Markdown("_Sources appear here._", elem_id="sources")
            inputs = [message, chatbot, variant, use_retrieval, temperature, top_p, max_new, repetition]
            send.click(respond, inputs, [chatbot, sources, message], api_name="chat")
            message.submit(respond, inputs, [chatbot, sources, message], api_name=False)
            clear.click(lambda: ([], "_Sources appear here._"), None, [chatbot, sources], api_name=False)
        with gr.Tab("Compare"):
            question = gr.Textbox(label="Question")
            with gr.Row():
                left = gr.Dropdown(variants, value=variants[0], label="Left")
                right = gr.Dropdown(variants, value=variants[-1], label="Right")
            compare_retrieval = gr.Checkbox(True, label="Retrieve passages")
            run_compare = gr.Button("Compare")
            with gr.Row():
                left_out, right_out = gr.Markdown(), gr.Markdown()
            run_compare.click(compare, [question, left, right, compare_retrieval],
                              [left_out, right_out], api_name="compare")
    return demo


def auth_from_env() -> tuple[str, str] | None:
    """ALIGNRAG_AUTH=user:password turns on Gradio's login page."""
    value = os.environ.get("ALIGNRAG_AUTH", "")
    if not value:
        return None
    user, _, password = value.partition(":")
    if not user or not password:
        raise UserError("ALIGNRAG_AUTH must look like user:password")
    return user, password


def build_app(engine: Engine, default_variant: str = "base"):
    from fastapi import FastAPI

    from service.openai_api import build_router

    api = FastAPI(title="alignrag")
    api.include_router(build_router(engine))
    demo = build_ui(engine, default_variant).queue(default_concurrency_limit=1, max_size=32)
    return gr.mount_gradio_app(api, demo, path="", auth=auth_from_env())
