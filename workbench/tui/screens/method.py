"""The Method screen (F3): the merge method and its parameters, as a form made from its schema.

Every registered method is offered, third-party plugins' included, and each gets its form from
its pydantic parameter schemas (see :mod:`workbench.tui.param_form`): global parameters go to the
recipe's ``parameters:``, per-model ones to each model's ``parameters:``. A value is checked as it
is typed and reaches the recipe as typed, valid or not: nothing is dropped silently. An invalid
one marks its field (class ``-invalid`` and the message under it) and is recorded in the state as
rejected, so the recipe check at the bottom says "not ok" naming the field, and Run and Save refuse
(both validate the state) until it is fixed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from textual import on
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import Input, Label, Select, Static, Switch

from workbench.errors import WorkbenchError
from workbench.method import MergeMethod
from workbench.tui.param_form import UNSET, ParamField, fields_of, show
from workbench.tui.screens.base import WorkbenchScreen
from workbench.tui.state import MISSING

BASE_TEXT = {"required": "required", "optional": "optional", "unused": "not used"}


def field_id(key: str, model: int | None) -> str:
    """The widget id of a parameter's field: ``param-KEY`` or ``model-I-param-KEY``."""
    return f"param-{key}" if model is None else f"model-{model}-param-{key}"


class MethodScreen(WorkbenchScreen):
    """Choose the method and fill in its parameters."""

    SUB_TITLE = "Method"
    CSS_PATH = "method.tcss"
    #: The marker of a field whose value is rejected (kept here: the .tcss files are the layout's).
    DEFAULT_CSS = """
    MethodScreen .-invalid { border: tall $error; }
    MethodScreen .-invalid:focus { border: tall $error-lighten-2; }
    """
    BINDINGS = [Binding("ctrl+r", "check_recipe", "Check recipe")]

    def __init__(self) -> None:
        super().__init__()
        #: Field widget id -> (model index or None for a global parameter, the field).
        self.fields: dict[str, tuple[int | None, ParamField]] = {}
        self._form_stale = False
        self._building = False

    def compose_body(self) -> Iterable[Widget]:
        yield Label("Method", classes="field-label")
        options = [(name, name) for name in sorted(self.registry.methods)]
        yield Select[str](options, prompt="choose a method", allow_blank=True, id="method-select")
        yield Static("", id="method-info", markup=False)
        yield VerticalScroll(id="params-form")
        yield Static("", id="recipe-check", markup=False)

    # -- the method ------------------------------------------------------------------------------

    def _method(self) -> type[MergeMethod] | None:
        entry = self.registry.methods.get(self.state.method)
        return entry.obj if entry is not None else None

    def refresh_from_state(self) -> None:
        select: Select[str] = self.query_one("#method-select", Select)
        with self.prevent(Select.Changed):
            select.value = self.state.method if self._method() else Select.NULL
        self._show_info()
        self._form_stale = True
        if not self._building:  # one build at a time: cancelling one half-way leaves half-mounted widgets
            # textual's WorkType union makes mypy solve ResultType as Never for an async method
            self.run_worker(self._build_forms, group="method-form")  # type: ignore[arg-type]
        self.action_check_recipe()

    def _show_info(self) -> None:
        method = self._method()
        info = self.query_one("#method-info", Static)
        if method is None:
            info.update(
                f"Unknown method '{self.state.method}': choose one above." if self.state.method else ""
            )
            return
        entry = self.registry.methods[method.name]
        models = (
            f"{method.min_models}+"
            if method.max_models is None
            else f"{method.min_models}-{method.max_models}"
        )
        lines = [
            method.summary,
            f"paper: {method.paper or '-'}",
            f"base model: {BASE_TEXT[method.base_model]}   models: {models}   plugin: {entry.plugin.name} "
            f"({entry.plugin.package})",
        ]
        info.update("\n".join(lines))

    @on(Select.Changed, "#method-select")
    def on_method_changed(self, event: Select.Changed) -> None:
        if event.value is Select.NULL or event.value == self.state.method:
            return
        self.set_method(str(event.value))

    def set_method(self, name: str) -> None:
        """Switch the recipe to ``name``, keeping the parameters the new method also has (the
        others would make the recipe fail: 'unknown parameter')."""
        method = self.registry.method(name)
        self.state.data["method"] = name
        model_keys = {f.key for f in fields_of(method.ModelParameters)}
        global_keys = {f.key for f in fields_of(method.Parameters)} | model_keys
        params = self.state.data.get("parameters") or {}
        kept = {k: v for k, v in params.items() if k in global_keys}
        if kept:
            self.state.data["parameters"] = kept
        else:
            self.state.data.pop("parameters", None)
        for entry in self._entries():
            entry["parameters"] = {
                k: v for k, v in (entry.get("parameters") or {}).items() if k in model_keys
            }
        self.refresh_from_state()

    def _entries(self) -> list[dict[str, Any]]:
        if "models" not in self.state.data and self.state.data.get("slices"):
            return []
        return self.state.models

    # -- the form --------------------------------------------------------------------------------

    async def _build_forms(self) -> None:
        """Rebuild the form until it shows the latest state (it may change during a build)."""
        self._building = True
        try:
            while self._form_stale:
                self._form_stale = False
                await self._build_form()
        finally:
            self._building = False

    async def _build_form(self) -> None:
        """Replace the form with the current method's fields, filled from the recipe."""
        form = self.query_one("#params-form", VerticalScroll)
        await form.remove_children()
        self.fields = {}
        method = self._method()
        if method is None:
            return
        widgets: list[Widget] = [Label("Parameters (the recipe's parameters:)", classes="section-title")]
        global_fields = fields_of(method.Parameters)
        values = self.state.data.get("parameters") or {}
        widgets += [w for f in global_fields for w in self._row(f, None, values)] or [
            Label("none", classes="param-help")
        ]
        model_fields = fields_of(method.ModelParameters)
        if model_fields:
            for i, entry in enumerate(self._entries()):
                widgets.append(Label(f"Model {entry['model']} (its parameters:)", classes="section-title"))
                values = entry.get("parameters") or {}
                widgets += [w for f in model_fields for w in self._row(f, i, values)]
            if self.state.data.get("slices"):
                widgets.append(
                    Label(
                        "Per-source parameters of slices are edited on the Recipe screen (F5).",
                        classes="param-help",
                    )
                )
        await form.mount_all(widgets)

    def _row(self, field: ParamField, model: int | None, values: dict[str, Any]) -> list[Widget]:
        """A parameter's label, input, help and (hidden until needed) error line."""
        wid = field_id(field.key, model)
        self.fields[wid] = (model, field)
        value = values.get(field.key, UNSET)
        default = "required" if field.required else f"default {show(field.default) or 'none'}"
        per_layer = " (or a list)" if field.per_layer else ""
        widget: Widget
        if field.kind == "switch":
            widget = Switch(
                value=bool(field.default if value is UNSET else value), id=wid, classes="param-switch"
            )
        elif field.kind == "select":
            options = [(str(c), c) for c in field.choices]
            current = value if value in field.choices else Select.NULL
            widget = Select(
                options, prompt=default, allow_blank=True, value=current, id=wid, classes="param-select"
            )
        else:
            kind = field.kind if field.kind in ("integer", "number") else "text"
            widget = Input(
                show(value), placeholder=default + per_layer, type=kind, id=wid, classes="param-input"
            )
        problem = field.check(value) if value is not UNSET or field.required else None
        error = Static(problem or "", id=f"{wid}-error", classes="error param-error", markup=False)
        error.display = problem is not None
        widget.set_class(problem is not None, "-invalid")
        self._record(wid, value, problem)
        row = Horizontal(
            Label(field.key, classes="param-name"),
            widget,
            Label(field.description.split(". ")[0], classes="param-help", markup=False),
            classes="param-row",
        )
        return [row, error]

    def _target(self, model: int | None) -> dict[str, Any]:
        """The parameters mapping a field writes to (created on first write)."""
        if model is None:
            return self.state.data.setdefault("parameters", {})
        entry = self._entries()[model]
        if not isinstance(entry.get("parameters"), dict):
            entry["parameters"] = {}
        return entry["parameters"]

    def field_name(self, wid: str) -> str:
        """A field as messages name it: ``density``, or ``density of model ft1``."""
        model, field = self.fields[wid]
        if model is None:
            return field.key
        entries = self._entries()
        ref = entries[model]["model"] if model < len(entries) else f"#{model + 1}"
        return f"{field.key} of model {ref}"

    def _record(self, wid: str, value: Any, problem: str | None) -> None:
        """Tell the state whether the field ``wid`` holds a rejected value."""
        model, field = self.fields[wid]
        name = self.field_name(wid)
        if problem is None:
            self.state.accept(name)
            return
        place: tuple[Any, ...] = (
            ("parameters", field.key) if model is None else ("models", model, "parameters", field.key)
        )
        self.state.reject(name, place, MISSING if value is UNSET else value, problem)

    def set_value(self, wid: str, value: Any) -> str | None:
        """Put ``value`` into the recipe for the field ``wid`` as typed, and mark the field if it is
        invalid (the state then refuses the recipe naming the field). Returns the error."""
        model, field = self.fields[wid]
        errors = self.query(f"#{wid}-error").results(Static)
        error = next(errors, None)
        if error is None:  # a message from a form being replaced
            return None
        problem = field.check(value)
        target = self._target(model)  # a field of a model removed meanwhile is rebuilt on resume
        if value is UNSET:
            target.pop(field.key, None)
            if model is None and not target:
                self.state.data.pop("parameters", None)
        else:
            target[field.key] = value
        self._record(wid, value, problem)
        error.update(problem or "")
        error.display = problem is not None
        for widget in self.query(f"#{wid}"):
            widget.set_class(problem is not None, "-invalid")
        self.action_check_recipe()
        return problem

    @on(Input.Changed, ".param-input")
    def on_param_input_changed(self, event: Input.Changed) -> None:
        wid = event.input.id or ""
        if event.input.is_attached and wid in self.fields:
            self.set_value(wid, self.fields[wid][1].parse(event.value))

    @on(Select.Changed, ".param-select")
    def on_param_select_changed(self, event: Select.Changed) -> None:
        wid = event.select.id or ""
        if event.select.is_attached and wid in self.fields:
            self.set_value(wid, UNSET if event.value is Select.NULL else event.value)

    @on(Switch.Changed, ".param-switch")
    def on_param_switch_changed(self, event: Switch.Changed) -> None:
        wid = event.switch.id or ""
        if (
            event.switch.is_attached and wid in self.fields
        ):  # the default is left out of the recipe, as the CLI would write it
            field = self.fields[wid][1]
            self.set_value(wid, UNSET if event.value == field.default else event.value)

    # -- the recipe as a whole -------------------------------------------------------------------

    def action_check_recipe(self) -> None:
        """Show what ``workbench validate`` says about the recipe now, and whether the method takes
        this many models and this base."""
        check = self.query_one("#recipe-check", Static)
        try:
            recipe = self.state.validate()
            self.registry.method(recipe.method)().check_inputs(recipe.model_count, recipe.base is not None)
        except WorkbenchError as exc:
            check.update(f"recipe not ok: {exc}")
            check.set_classes("error")
        else:
            check.update(f"recipe ok: {recipe.method} over {recipe.model_count} model(s)")
            check.set_classes("ok")
