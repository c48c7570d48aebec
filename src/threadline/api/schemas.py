"""Request and response bodies. Unknown fields (a forged `user_id`, say) are ignored."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints

from threadline.auth.emails import EMAIL_PATTERN
from threadline.statuses import MessageRole, MultitaskStrategy, RunStatus, ThreadStatus

if TYPE_CHECKING:
    # Only the `of()` constructors name the store's rows: the Python client imports these
    # schemas without SQLAlchemy (tests/unit/test_client_imports.py).
    from threadline.store.messages import Message
    from threadline.store.runs import Run
    from threadline.store.threads import Thread
    from threadline.store.users import User

T = TypeVar("T")
# The OpenAPI document states what the server accepts, so that whatever it calls valid is
# accepted: some text besides whitespace and no NUL, which no store takes. Stated in the schema
# only (`json_schema_extra`): the stores check it with their own error codes.
TEXT_PATTERN = r"^[^\x00]*[^\s\x00][^\x00]*$"
_SOME_TEXT = Field(json_schema_extra={"pattern": TEXT_PATTERN})
Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    _SOME_TEXT,
]
Metadata = dict[str, JsonValue]


class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorBody(Schema):
    code: str = Field(description="Stable, machine-readable error code")
    message: str


class ErrorOut(Schema):
    error: ErrorBody


class Credentials(Schema):
    email: Annotated[str, StringConstraints(max_length=320)]
    password: Annotated[str, StringConstraints(max_length=1024)]


class Registration(Schema):
    """A new account: what `auth.service.normalize_email` and `check_password` accept."""

    email: Annotated[
        str,
        StringConstraints(max_length=320),
        Field(json_schema_extra={"pattern": EMAIL_PATTERN}),
    ]
    password: Annotated[
        str,
        StringConstraints(max_length=1024),
        Field(json_schema_extra={"minLength": 8, "maxLength": 256}),
    ]


class UserOut(Schema):
    id: str
    email: str
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(id=user.id, email=user.email, created_at=user.created_at)


class TokenOut(Schema):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


class ThreadCreate(Schema):
    title: Title | None = None
    metadata: Metadata = Field(default_factory=dict)


class ThreadUpdate(Schema):
    """Only the fields present change. `metadata` is merged: a null value removes its key."""

    title: Title | None = None
    metadata: Metadata | None = None
    status: ThreadStatus | None = None


class ThreadOut(Schema):
    id: str
    title: str | None
    status: ThreadStatus
    metadata: Metadata
    version: int
    message_count: int
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime

    @classmethod
    def of(cls, thread: Thread) -> ThreadOut:
        return cls(
            id=thread.id,
            title=thread.title,
            status=thread.status,
            metadata=thread.metadata,
            version=thread.version,
            message_count=thread.message_count,
            created_at=thread.created_at,
            updated_at=thread.updated_at,
            last_activity_at=thread.last_activity_at,
        )


class RunCreate(Schema):
    agent: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    multitask_strategy: MultitaskStrategy = Field(
        default=MultitaskStrategy.ENQUEUE,
        description="When the thread already has an active run: reject (409), enqueue after "
        "it, or interrupt it (cancel) and run this one next",
    )


class MessageCreate(Schema):
    content: Annotated[str, StringConstraints(max_length=1_000_000), _SOME_TEXT]
    metadata: Metadata = Field(default_factory=dict)
    run: RunCreate | None = Field(default=None, description="Start an agent run on the thread")


class MessageOut(Schema):
    id: str
    thread_id: str
    position: int
    role: MessageRole
    content: str
    metadata: Metadata
    run_id: str | None
    tool_calls: list[dict[str, JsonValue]] | None
    tool_call_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, message: Message) -> MessageOut:
        return cls(
            id=message.id,
            thread_id=message.thread_id,
            position=message.position,
            role=message.role,
            content=message.content,
            metadata=message.metadata,
            run_id=message.run_id,
            tool_calls=message.tool_calls,
            tool_call_id=message.tool_call_id,
            created_at=message.created_at,
        )


class RunOut(Schema):
    id: str
    thread_id: str
    agent: str
    status: RunStatus
    attempt: int
    cancel_requested: bool
    result: dict[str, JsonValue] | None
    error: dict[str, JsonValue] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, run: Run) -> RunOut:
        return cls(
            id=run.id,
            thread_id=run.thread_id,
            agent=run.agent,
            status=run.status,
            attempt=run.attempt,
            cancel_requested=run.cancel_requested,
            result=run.result,
            error=run.error,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
        )


class MessagePosted(MessageOut):
    run: RunOut | None = None


class ToolOut(Schema):
    name: str
    description: str
    parameters: dict[str, JsonValue]


class AgentOut(Schema):
    name: str
    description: str
    model: str
    tools: list[ToolOut]


class ListOut(Schema, Generic[T]):
    data: list[T]
    next_cursor: str | None


class HealthOut(Schema):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
