"""The Gradio chat UI, mounted with the OpenAI-compatible routes on one FastAPI server."""
from __future__ import annotations

import html
import logging
import os
from pathlib import Path

import gradio as gr

from pipeline.errors import UserError
from pipeline.prompt import cited_numbers
from service.engine import Engine, GenerationSettings
from service.library import MAX_UPLOAD_BYTES

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


def build_ui(engine: Engine, default_variant: str = "base", library=None, feedback=None) -> gr.Blocks:
    variants = engine.variants() or ["base"]
    default_variant = default_variant if default_variant in variants else variants[0]

    def respond(message, chat, answered, variant, use_retrieval, temperature, top_p, max_new_tokens,
                repetition_penalty, copy_decoding=True):
        chat = list(chat or [])
        answered = dict(answered or {})
        history = history_pairs(chat)
        chat.append({"role": "user", "content": message})
        chat.append({"role": "assistant", "content": ""})
        settings = GenerationSettings(temperature, top_p, int(max_new_tokens), repetition_penalty,
                                      copy_decoding=bool(copy_decoding))
        try:
            for reply in engine.stream(message, history=history, variant=variant,
                                       use_retrieval=use_retrieval, settings=settings):
                chat[-1] = {"role": "assistant", "content": reply.text}
                answered[len(chat) - 1] = {"variant": reply.variant, "prompt": reply.messages,
                                           "answer": reply.text}
                yield chat, sources_markdown(reply.passages, reply.text), "", answered
        except UserError as err:
            chat[-1] = {"role": "assistant", "content": f"⚠️ {err}"}
            yield chat, "", "", answered
        except Exception as err:  # one failing request must not take the server down
            log.exception("chat request failed")
            chat[-1] = {"role": "assistant", "content": f"⚠️ Something went wrong: {err}"}
            yield chat, "", "", answered

    def rate(data: gr.LikeData, answered):
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        turn = (answered or {}).get(index) or (answered or {}).get(str(index))
        if feedback is None or turn is None or not turn["prompt"]:
            return "_Nothing to rate yet._"
        feedback.record(turn["variant"], turn["prompt"], turn["answer"], 1 if data.liked else -1)
        return "Thanks: feedback saved."

    def improve(better, answered):
        if feedback is None or not answered or not (better or "").strip():
            return "_Write a better answer for the last reply first._", better
        last = max(answered, key=int)
        turn = answered[last]
        feedback.record(turn["variant"], turn["prompt"], turn["answer"], -1, better)
        return "Thanks: your better answer was saved as a preference pair.", ""

    def documents_table():
        if library is None:
            return "_Uploads need the documents folder: start with the default index or `--docs DIR`._"
        rows = library.documents()
        if not rows:
            return "_No uploaded documents yet._"
        return "\n".join(f"- `{r['name']}` ({r['kilobytes']} kB)" for r in rows)

    def upload(files):
        if library is None:
            return documents_table(), "Uploads are off for this server."
        messages = []
        for file in files or []:
            path = getattr(file, "name", file)
            try:
                engine.set_index(library.add_path(Path(path)))  # its embedding batches are model calls
                messages.append(f"added {Path(path).name}")
            except UserError as err:
                messages.append(f"⚠️ {err}")
        return documents_table(), "; ".join(messages) or "Choose files first."

    def remove(name):
        if library is None or not name:
            return documents_table(), "Choose a document to remove."
        try:
            engine.set_index(library.remove(name))
            return documents_table(), f"removed {name}"
        except UserError as err:
            return documents_table(), f"⚠️ {err}"

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
                    with gr.Row():
                        better = gr.Textbox(placeholder="Optional: a better answer to the last reply",
                                            show_label=False, scale=5)
                        send_better = gr.Button("Save better answer", scale=1)
                    feedback_note = gr.Markdown("")
                    clear = gr.Button("Clear conversation")
                    answered = gr.State({})
                with gr.Column(scale=2):
                    variant = gr.Dropdown(variants, value=default_variant, label="Model variant")
                    use_retrieval = gr.Checkbox(True, label="Retrieve passages")
                    with gr.Accordion("Generation settings", open=False):
                        copy_decoding = gr.Checkbox(True, label="Copy decoding: reply with one cited passage "
                                                    "sentence or the refusal (greedy, trained variants)")
                        temperature = gr.Slider(0.0, 1.5, 0.0, step=0.05, label="Temperature (0 = greedy)")
                        top_p = gr.Slider(0.1, 1.0, 0.9, step=0.05, label="Top-p")
                        max_new = gr.Slider(16, 512, 160, step=16, label="Max new tokens")
                        repetition = gr.Slider(1.0, 2.0, 1.0, step=0.05, label="Repetition penalty (1 = off: lets the answer copy the passages)")
                    sources = gr.Markdown("_Sources appear here._", elem_id="sources")
            inputs = [message, chatbot, answered, variant, use_retrieval, temperature, top_p, max_new,
                      repetition, copy_decoding]
            outputs = [chatbot, sources, message, answered]
            send.click(respond, inputs, outputs, api_name="chat")
            message.submit(respond, inputs, outputs, api_name=False)
            chatbot.like(rate, [answered], [feedback_note], api_name=False)
            send_better.click(improve, [better, answered], [feedback_note, better], api_name=False)
            clear.click(lambda: ([], "_Sources appear here._", {}), None, [chatbot, sources, answered],
                        api_name=False)
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
        with gr.Tab("Documents"):
            gr.Markdown("Upload .md, .txt, .html, .pdf or BEIR .jsonl files (10 MB each at most); "
                        "they are indexed incrementally and answers can cite them at once.")
            files = gr.File(file_count="multiple", label="Files")
            add = gr.Button("Add to the index", variant="primary")
            listing = gr.Markdown(documents_table())
            with gr.Row():
                to_remove = gr.Textbox(label="Uploaded document to remove (its name)", scale=4)
                drop = gr.Button("Remove", scale=1)
            status = gr.Markdown("")
            add.click(upload, [files], [listing, status], api_name="upload")
            drop.click(remove, [to_remove], [listing, status], api_name="remove_document")
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


def api_key_from_env() -> str | None:
    """The bearer key for /v1: ALIGNRAG_API_KEY, else the password of ALIGNRAG_AUTH (one
    credential for the UI and the API), else None (no auth)."""
    key = os.environ.get("ALIGNRAG_API_KEY", "").strip()
    if key:
        return key
    login = auth_from_env()
    return login[1] if login else None


def build_app(engine: Engine, default_variant: str = "base", library=None, feedback=None):
    from fastapi import FastAPI

    from service.openai_api import build_router, install_error_handlers

    api_key = api_key_from_env()
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    api = FastAPI(title="alignrag", **docs)
    install_error_handlers(api)
    api.include_router(build_router(engine, api_key, default_variant))
    demo = build_ui(engine, default_variant, library, feedback).queue(default_concurrency_limit=1, max_size=32)
    return gr.mount_gradio_app(api, demo, path="", auth=auth_from_env(),
                               max_file_size=library.max_bytes if library else MAX_UPLOAD_BYTES)
