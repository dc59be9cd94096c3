"""Pydantic models of the OpenAI-compatible API: requests, responses, and the error shape.

Requests accept vLLM's sampling extras (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, include_stop_str_in_output, skip_special_tokens, priority). Unknown fields are
ignored, as the OpenAI API and vLLM do. Responses are built as plain dicts in completions.py / chat.py
(they are serialised once per streamed chunk, so avoiding model validation there is worth it); the
response models at the end of this module document them (the OpenAPI document) and are what the
tests validate real responses against.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from vllm_engine.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[Union[str, int]] = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class JsonSchemaFormat(OpenAIBaseModel):
    name: str = "response"
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIBaseModel):
    """OpenAI's ``response_format``: text (no constraint), json_object, or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputsField(OpenAIBaseModel):
    """vLLM's ``structured_outputs`` request field (one of these)."""

    json_: Optional[Union[str, dict[str, Any]]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


class _SamplingFields(OpenAIBaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    priority: int = 0
    # Structured outputs: OpenAI's response_format, or vLLM's fields (at most one of them)
    response_format: Optional[ResponseFormat] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = Field(None, description="An EBNF grammar (xgrammar's dialect, rule `root`).")
    structured_outputs: Optional[StructuredOutputsField] = None

    def structured_outputs_params(self) -> tuple[Optional[StructuredOutputsParams], Optional[str]]:
        """The constraint this request asks for, and the request field that asked (for errors).

        Raises SamplingParamsError naming the field when two fields ask at once or one is malformed.
        """
        asked: list[tuple[str, dict]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise SamplingParamsError("response_format", "of type json_schema needs json_schema.schema.")
            asked.append(("response_format", {"json": rf.json_schema.json_schema}))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                asked.append((name, {kind: getattr(self, name)}))
        if self.structured_outputs is not None:
            fields = self.structured_outputs.model_dump(exclude_none=True)  # "json_" -> "json"
            asked.append(("structured_outputs", {k.rstrip("_"): v for k, v in fields.items()}))
        if not asked:
            return None, None
        if len(asked) > 1:
            raise SamplingParamsError(asked[1][0], f"cannot be combined with {asked[0][0]}: ask for one "
                                                   f"structured output.")
        field_name, kwargs = asked[0]
        try:
            return StructuredOutputsParams(**kwargs), field_name
        except SamplingParamsError as e:
            raise SamplingParamsError(field_name, e.detail if e.param == "structured_outputs" else str(e)) from e

    def build_sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                              generation_config: dict, prompt_logprobs: Optional[int] = None,
                              structured_outputs: Optional[StructuredOutputsParams] = None) -> SamplingParams:
        """SamplingParams for this request; unset fields take the model's generation_config defaults.

        Raises ValueError (naming the field) for an invalid value.
        """
        g = generation_config or {}

        def pick(value: Any, key: str, fallback: Any) -> Any:
            if value is not None:
                return value
            return g[key] if g.get(key) is not None else fallback

        temperature = pick(self.temperature, "temperature", 1.0)
        if self.temperature is None and g.get("do_sample") is False:
            temperature = 0.0
        logit_bias = None
        if self.logit_bias is not None:
            try:
                logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError as e:
                raise SamplingParamsError(
                    "logit_bias", f"keys must be token ids (integers), got {list(self.logit_bias)!r}.") from e
        return SamplingParams(
            n=self.n, temperature=temperature, top_p=pick(self.top_p, "top_p", 1.0),
            top_k=pick(self.top_k, "top_k", -1), min_p=pick(self.min_p, "min_p", 0.0), seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick(self.repetition_penalty, "repetition_penalty", 1.0),
            logit_bias=logit_bias, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=structured_outputs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    # Smart-mode union: [1, 2] is token ids, ["a"] strings, [[1, 2]] a batch of token-id prompts.
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # a tool message: the call it answers

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    max_tokens: Optional[int] = None  # deprecated by OpenAI in favour of max_completion_tokens; still accepted
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = Field(None, description="A Jinja template replacing the model's; refused "
                                                           "unless the server runs with --trust-request-chat-template.")
    add_special_tokens: bool = False
    echo: bool = False
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = Field(
        None, description="Default: auto with tools, none without. required and a named function are enforced by "
                          "a grammar.")
    parallel_tool_calls: bool = True


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(OpenAIBaseModel):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: list[int]


class APIError(Exception):
    """An error the server answers in OpenAI's shape with ``status`` (and extra headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[Union[str, int]] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = code if code is not None else status
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


# ---- responses ---------------------------------------------------------------------------------------
# The server builds its responses as plain dicts (speed); these models document them in the OpenAPI
# document, and the tests validate real responses against them. ``extra="forbid"``: a key the server
# sends but these models lack is a documentation bug the fuzz test catches.
FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]
StopReason = Optional[Union[int, str]]  # the stop token id or stop string that ended the sample


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: Optional[str] = Field(description="The request field at fault, as the client spelled it.")
    code: Optional[Union[str, int]] = Field(description="A machine-readable code (e.g. model_not_found), "
                                                        "else the HTTP status.")


class ErrorResponse(ResponseModel):
    """Every error: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape)."""

    error: ErrorInfo


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache.")


class UsageInfo(ResponseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Every sample's generated tokens, including a final EOS.")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int = Field(description="i * n + j: sample j of prompt i.")
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: FinishReason
    stop_reason: StopReason


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamChoice(ResponseModel):
    index: int
    text: str = Field(description="What is new since this choice's last chunk.")
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[FinishReason]
    stop_reason: StopReason


class CompletionStreamResponse(ResponseModel):
    """One ``data:`` event of a streamed completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Optional[UsageInfo] = Field(None, description="With stream_options.include_usage: null, except in the "
                                                         "last chunk (which has no choices).")


class ChatTopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobEntry(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(ResponseModel):
    content: list[ChatLogprobEntry]


class ResponseFunctionCall(ResponseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text, exactly as generated.")


class ResponseToolCall(ResponseModel):
    id: str
    type: Literal["function"]
    function: ResponseFunctionCall


class ChatResponseMessage(ResponseModel):
    role: Literal["assistant"]
    content: Optional[str] = Field(description="null when the reply is only tool calls.")
    tool_calls: list[ResponseToolCall] = Field(default_factory=list)


class ChatChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: FinishReason
    stop_reason: StopReason


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(ResponseModel):
    name: Optional[str] = Field(None, description="In the call's first delta only.")
    arguments: str = Field(description="What is new of the arguments' JSON text.")


class DeltaToolCall(ResponseModel):
    index: int
    id: Optional[str] = Field(None, description="In the call's first delta only.")
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall


class ChatDelta(ResponseModel):
    role: Optional[Literal["assistant"]] = Field(None, description="Only in each choice's first chunk.")
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatStreamChoice(ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[FinishReason]
    stop_reason: StopReason = None


class ChatCompletionStreamResponse(ResponseModel):
    """One ``data:`` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = Field(None, description="With stream_options.include_usage: null, except in the "
                                                         "last chunk (which has no choices).")


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: Optional[str]
    max_model_len: int


class ModelList(ResponseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str


class VersionResponse(ResponseModel):
    version: str
