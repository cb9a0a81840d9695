"""Reading a proto3 schema (the `.proto` of a ThingsBoard-style protobuf profile) into the
FileDescriptorProto protoc makes of it -- the tests check it against Debian's protoc -- and the
message class Google's protobuf runtime builds from that.

Why our own reader and not protoc: a profile is uploaded to a running server, which should not need
a compiler installed to take it; the language ThingsBoard accepts is small, and reading it
ourselves lets every error name its line and column.  It is what ThingsBoard accepts: proto3 only;
one file (no `import`); no options except a field's `packed`, `deprecated` and `json_name` (and an
enum's `allow_alias`); no services, extensions, groups, `required` or default values.  Messages,
nested messages and enums, `optional`, `repeated`, `map`, `oneof` and `reserved` are all there.

Schemas corem carries itself may be several files that import one another (Efento's published
`.proto` files: corem/frontdoors/efento): `read_schemas` reads such a set, each file as protoc makes
it, and `pool_of` puts them in one descriptor pool.  A profile's schema stays one file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from ..errors import BadInput

#: a schema is text a person wrote; this bounds what one upload costs to read
MAX_SCHEMA_BYTES = 64 * 1024
#: messages defined inside messages, at most this deep: the reader recurses once a level (about 990
#: levels ran out of Python's stack, a 500), and upb's own descriptor parse refuses about 100, so a
#: deeper schema could never be used; refused naming the line instead
MAX_NESTING = 64
MAX_FIELD_NUMBER = 2 ** 29 - 1
RESERVED_NUMBERS = range(19000, 20000)  # the protobuf implementation's own

FDP = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    "double": FDP.TYPE_DOUBLE, "float": FDP.TYPE_FLOAT, "int64": FDP.TYPE_INT64, "uint64": FDP.TYPE_UINT64,
    "int32": FDP.TYPE_INT32, "fixed64": FDP.TYPE_FIXED64, "fixed32": FDP.TYPE_FIXED32, "bool": FDP.TYPE_BOOL,
    "string": FDP.TYPE_STRING, "bytes": FDP.TYPE_BYTES, "uint32": FDP.TYPE_UINT32, "sfixed32": FDP.TYPE_SFIXED32,
    "sfixed64": FDP.TYPE_SFIXED64, "sint32": FDP.TYPE_SINT32, "sint64": FDP.TYPE_SINT64,
}
UNPACKABLE = (FDP.TYPE_STRING, FDP.TYPE_BYTES, FDP.TYPE_MESSAGE)
#: what a map's key may be (protobuf language guide: integral and string types)
MAP_KEYS = {n for n in SCALARS if n not in ("double", "float", "bytes")}
NOT_SUPPORTED = {
    "import": "imports are not supported: a profile's schema is one file",
    "option": "options are not supported (ThingsBoard's rule too; they steer code generators, not the wire)",
    "service": "services are not supported: a profile's schema describes payloads",
    "extend": "extensions are not supported in proto3",
    "extensions": "extensions are not supported in proto3",
    "required": "required is proto2; proto3 fields are optional or repeated",
    "group": "groups are proto2 and deprecated",
}
FIELD_OPTIONS = ("packed", "deprecated", "json_name")


class SchemaError(BadInput):
    """A schema that cannot be used; the message starts with its line and column."""


class UnknownMessage(BadInput):
    """The profile names a message the schema does not define."""


# -- reading the schema ----------------------------------------------------------------------------
TOKEN_RE = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<int>0[xX][0-9A-Fa-f]+|[0-9]+)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<symbol>[{}()\[\]<>;,=.\-])
""", re.VERBOSE | re.DOTALL)


@dataclass(slots=True, frozen=True)
class Token:
    kind: str
    text: str
    line: int
    col: int


def tokens(text: str) -> list[Token]:
    out = []
    at, line, line_start = 0, 1, 0
    while at < len(text):
        m = TOKEN_RE.match(text, at)
        if m is None:
            what = "an unterminated comment" if text.startswith("/*", at) else (
                "an unterminated string" if text[at] in "\"'" else repr(text[at]))
            raise SchemaError(f"line {line}:{at - line_start + 1}: {what}")
        kind = m.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            out.append(Token(kind, m.group(), line, at - line_start + 1))
        newlines = m.group().count("\n")
        if newlines:
            line += newlines
            line_start = at + m.group().rindex("\n") + 1
        at = m.end()
    return out


@dataclass(slots=True)
class _Pending:
    """A field whose type names a message or enum, resolved once every type is known."""

    field: descriptor_pb2.FieldDescriptorProto
    type_name: str
    scope: str
    token: Token


@dataclass(slots=True)
class _Message:
    """What one message's checks need while its body is read."""

    proto: descriptor_pb2.DescriptorProto
    numbers: dict[int, str] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    #: protoc refuses two fields whose JSON names differ only in case or underscores
    json_names: dict[str, str] = field(default_factory=dict)
    optionals: list[descriptor_pb2.FieldDescriptorProto] = field(default_factory=list)


#: a set of files' reader asks for an imported file by name: its descriptor, None if not in the set
Importer = Callable[[str], "descriptor_pb2.FileDescriptorProto | None"]


class _Reader:
    def __init__(self, text: str, name: str = "profile.proto", importer: Importer | None = None) -> None:
        self.toks = tokens(text)
        self.at = 0
        self.file = descriptor_pb2.FileDescriptorProto(name=name, syntax="proto3")
        self.pending: list[_Pending] = []
        #: every message's and enum's full name (".pkg.Outer.Inner") -> "message" / "enum"
        self.types: dict[str, str] = {}
        #: None: one file, `import` refused (a profile's schema)
        self.importer = importer
        #: the packages of the imported files (a type's name may start with one)
        self.imported_packages: set[str] = set()
        #: messages being read, the one at hand included (MAX_NESTING)
        self.depth = 0

    # tokens
    def peek(self, ahead: int = 0) -> Token | None:
        i = self.at + ahead
        return self.toks[i] if i < len(self.toks) else None

    def next_is(self, ahead: int, text: str | None = None, kind: str | None = None) -> bool:
        tok = self.peek(ahead)
        return tok is not None and (text is None or tok.text == text) and (kind is None or tok.kind == kind)

    def here(self) -> Token:
        """The next token, not taken (SchemaError if the schema has ended)."""
        tok = self.peek()
        return tok if tok is not None else self._ended()

    def _ended(self) -> Token:
        last = self.toks[-1] if self.toks else Token("", "", 1, 0)
        raise SchemaError(f"line {last.line}:{last.col + len(last.text)}: the schema ends too soon")

    def take(self) -> Token:
        tok = self.here()
        self.at += 1
        return tok

    def fail(self, tok: Token, reason: str) -> SchemaError:
        return SchemaError(f"line {tok.line}:{tok.col}: {reason}")

    def expect(self, text: str) -> Token:
        tok = self.take()
        if tok.text != text:
            raise self.fail(tok, f"expected {text!r}, got {tok.text!r}")
        return tok

    def accept(self, text: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.text == text and tok.kind != "string":
            self.at += 1
            return True
        return False

    def ident(self, what: str) -> str:
        tok = self.take()
        if tok.kind != "ident":
            raise self.fail(tok, f"expected {what}, got {tok.text!r}")
        return tok.text

    def dotted(self, what: str) -> str:
        name = "." if self.accept(".") else ""
        name += self.ident(what)
        while self.accept("."):
            name += "." + self.ident(what)
        return name

    def integer(self, what: str, negative: bool = False) -> int:
        sign = -1 if negative and self.accept("-") else 1
        tok = self.take()
        if tok.kind != "int":
            raise self.fail(tok, f"expected {what} (an integer), got {tok.text!r}")
        text = tok.text
        if len(text) > 20:  # past 64 bits in any base protobuf has
            raise self.fail(tok, f"{what}: {text[:20]}... is too large")
        if text.startswith(("0x", "0X")):
            return sign * int(text, 16)
        if len(text) > 1 and text[0] == "0":  # octal, as in C and protoc
            if not set(text) <= set("01234567"):
                raise self.fail(tok, f"{what}: {text} starts with 0, so it is octal, and has a digit 8 or 9")
            return sign * int(text, 8)
        return sign * int(text)

    def boolean(self, what: str) -> bool:
        tok = self.take()
        if tok.text not in ("true", "false") or tok.kind != "ident":
            raise self.fail(tok, f"{what} is true or false, not {tok.text!r}")
        return tok.text == "true"

    def string(self, what: str) -> str:
        tok = self.take()
        if tok.kind != "string":
            raise self.fail(tok, f"expected {what} (a quoted string), got {tok.text!r}")
        try:  # (an escape cut short -- "\u12" -- is the schema's fault: found by the fuzz target)
            text = tok.text[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as e:
            raise self.fail(tok, f"{what} holds an escape cut short ({e.reason})") from None
        try:
            text.encode()
        except UnicodeEncodeError:  # (an escaped lone surrogate: no UTF-8, so no descriptor, says it)
            raise self.fail(tok, f"{what} is not text UTF-8 can say") from None
        return text

    def refuse(self, tok: Token) -> None:
        if tok.kind == "ident" and tok.text in NOT_SUPPORTED:
            raise self.fail(tok, NOT_SUPPORTED[tok.text])

    # the file
    def read(self) -> descriptor_pb2.FileDescriptorProto:
        first = self.peek()
        if first is None or first.text != "syntax":
            raise SchemaError(f"line {first.line if first else 1}:{first.col if first else 1}: the schema must "
                              "start with syntax = \"proto3\";")
        self.take()
        self.expect("=")
        syntax_tok = self.here()
        if self.string("the syntax") != "proto3":
            raise self.fail(syntax_tok, f"only proto3 schemas are supported (ThingsBoard's rule too), not "
                                        f"{syntax_tok.text}")
        self.expect(";")
        package_tok: Token | None = None
        top: list[_Message] = []
        while (tok := self.peek()) is not None:
            if tok.text == "import" and self.importer is not None:
                self.import_(tok)
                continue
            self.refuse(tok)
            if self.accept(";"):
                continue
            if tok.text == "package":
                if package_tok is not None or top or self.file.enum_type:
                    raise self.fail(tok, "package must come once, before the messages")
                self.take()
                package_tok = tok
                self.file.package = self.dotted("the package name").lstrip(".")
                self.expect(";")
            elif tok.text == "message":
                top.append(self.message(self.file.message_type.add(), self._scope("")))
            elif tok.text == "enum":
                self.enum(self.file.enum_type.add(), self._scope(""))
            else:
                raise self.fail(tok, f"expected message, enum or package, got {tok.text!r}")
        if not top and self.importer is None:  # (a file of a set may hold only enums)
            raise SchemaError("line 1:1: the schema defines no message")
        self.resolve()
        return self.file

    def import_(self, tok: Token) -> None:
        """`import "name.proto";`: the file's types become visible here (not its own imports')."""
        assert self.importer is not None
        self.take()
        if self.next_is(0, kind="ident") and self.here().text in ("public", "weak"):
            raise self.fail(self.here(), f"import {self.here().text} is not supported")
        name_tok = self.here()
        name = self.string("the imported file's name")
        self.expect(";")
        if name in self.file.dependency:
            raise self.fail(name_tok, f"{name!r} is imported twice")
        imported = self.importer(name)
        if imported is None:
            raise self.fail(name_tok, f"{name!r} is not one of the files read with this one")
        self.file.dependency.append(name)
        package = f".{imported.package}" if imported.package else ""
        if imported.package:
            parts = imported.package.split(".")
            self.imported_packages.update("." + ".".join(parts[:i]) for i in range(1, len(parts) + 1))
        for full, kind in _declared(imported.message_type, imported.enum_type, package):
            if full in self.types:
                raise self.fail(name_tok, f"{full.lstrip('.')!r} is defined in {name!r} and before it")
            self.types[full] = kind

    def _scope(self, inner: str) -> str:
        package = f".{self.file.package}" if self.file.package else ""
        return f"{package}{inner}"

    def declare(self, tok: Token, scope: str, name: str, kind: str) -> str:
        full = f"{scope}.{name}"
        if full in self.types:
            raise self.fail(tok, f"{name!r} is already defined in {scope.lstrip('.') or 'the file'}")
        self.types[full] = kind
        return full

    # messages
    def message(self, proto: descriptor_pb2.DescriptorProto, scope: str) -> _Message:
        self.expect("message")
        tok = self.here()
        if self.depth >= MAX_NESTING:
            raise self.fail(tok, f"messages are nested more than {MAX_NESTING} deep")
        self.depth += 1
        try:
            return self._message(proto, scope, tok)
        finally:
            self.depth -= 1

    def _message(self, proto: descriptor_pb2.DescriptorProto, scope: str, tok: Token) -> _Message:
        proto.name = self.ident("the message's name")
        full = self.declare(tok, scope, proto.name, "message")
        msg = _Message(proto)
        first_tok = self.expect("{")
        while not self.accept("}"):
            tok = self.here()
            self.refuse(tok)
            if self.accept(";"):
                continue
            if tok.text == "message" and self.next_is(1, kind="ident"):
                self.message(proto.nested_type.add(), full)
            elif tok.text == "enum" and self.next_is(1, kind="ident"):
                self.enum(proto.enum_type.add(), full)
            elif tok.text == "oneof" and self.next_is(2, "{"):
                self.oneof(msg, full)
            elif tok.text == "reserved":
                self.reserved(msg)
            elif tok.text == "map" and self.next_is(1, "<"):
                self.map_field(msg, full)
            else:
                self.field(msg, full, None)
        self.check_reserved(msg, first_tok)
        # proto3 `optional`: each in a oneof of its own, after the declared ones (as protoc does)
        for f in msg.optionals:
            f.oneof_index = len(proto.oneof_decl)
            proto.oneof_decl.add(name=f"_{f.name}")
        return msg

    def field(self, msg: _Message, scope: str, oneof: int | None) -> None:
        first = self.here()
        label = FDP.LABEL_OPTIONAL
        optional = False
        if oneof is None and first.text in ("repeated", "optional") and self.next_is(2, kind="ident"):
            self.take()
            label = FDP.LABEL_REPEATED if first.text == "repeated" else FDP.LABEL_OPTIONAL
            optional = first.text == "optional"
        elif first.text in ("repeated", "optional") and oneof is not None:
            raise self.fail(first, f"a oneof's fields take no label ({first.text})")
        type_tok = self.here()
        type_name = self.dotted("a field type")
        f = msg.proto.field.add(label=label)
        self.field_rest(msg, f, type_name, type_tok, scope)
        if oneof is not None:
            f.oneof_index = oneof
        if optional:
            f.proto3_optional = True
            msg.optionals.append(f)

    def field_rest(self, msg: _Message, f: descriptor_pb2.FieldDescriptorProto, type_name: str | None,
                   type_tok: Token, scope: str) -> None:
        """The `name = number [options];` after a field's type, checked (`type_name` None: the
        caller sets the type)."""
        name_tok = self.here()
        f.name = self.ident("the field's name")
        self.expect("=")
        number_tok = self.here()
        number = self.integer("the field number")
        f.json_name = json_name(f.name)
        if f.name in msg.names:
            raise self.fail(name_tok, f"field {f.name!r} is defined twice in {msg.proto.name}")
        msg.names.add(f.name)
        folded = f.json_name.lower()
        if folded in msg.json_names:
            raise self.fail(name_tok, f"field {f.name!r}: its JSON name is {msg.json_names[folded]!r}'s too "
                                      "(they differ only in case or underscores)")
        msg.json_names[folded] = f.name
        self.check_number(msg, number_tok, number, f.name)
        f.number = number
        if type_name in SCALARS:
            f.type = SCALARS[type_name]
        elif type_name is not None:
            self.pending.append(_Pending(f, type_name, scope, type_tok))
        if self.accept("["):
            self.field_options(f)
        self.expect(";")

    def field_options(self, f: descriptor_pb2.FieldDescriptorProto) -> None:
        while True:
            tok = self.here()
            name = self.ident("an option")
            self.expect("=")
            if name == "json_name":
                f.json_name = self.string(f"field {f.name!r}: json_name")
            elif name in ("packed", "deprecated"):
                value = self.boolean(name)
                if name == "packed" and (f.label != FDP.LABEL_REPEATED or f.type in UNPACKABLE):
                    raise self.fail(tok, f"field {f.name!r}: packed is for repeated numbers, bools and enums")
                setattr(f.options, name, value)
            elif name == "default":
                raise self.fail(tok, "default values are not supported in proto3")
            else:
                raise self.fail(tok, f"option {name!r} is not supported; a field takes {', '.join(FIELD_OPTIONS)}")
            if not self.accept(","):
                break
        self.expect("]")

    def check_number(self, msg: _Message, tok: Token, number: int, name: str) -> None:
        if not 1 <= number <= MAX_FIELD_NUMBER:
            raise self.fail(tok, f"field {name!r}: numbers are 1 to {MAX_FIELD_NUMBER}, not {number}")
        if number in RESERVED_NUMBERS:
            raise self.fail(tok, f"field {name!r}: 19000-19999 are reserved for the protobuf implementation")
        if number in msg.numbers:
            raise self.fail(tok, f"field {name!r}: number {number} is taken by {msg.numbers[number]!r}")
        msg.numbers[number] = name

    def check_reserved(self, msg: _Message, tok: Token) -> None:
        """Reserved numbers and names are refused to fields declared before them as after."""
        for r in msg.proto.reserved_range:
            taken = [n for n in msg.numbers if r.start <= n < r.end]
            if taken:
                raise self.fail(tok, f"{msg.proto.name}: field {msg.numbers[taken[0]]!r} uses reserved "
                                     f"number {taken[0]}")
        for name in msg.proto.reserved_name:
            if name in msg.names:
                raise self.fail(tok, f"{msg.proto.name}: field name {name!r} is reserved")

    def oneof(self, msg: _Message, scope: str) -> None:
        self.expect("oneof")
        index = len(msg.proto.oneof_decl)
        msg.proto.oneof_decl.add(name=self.ident("the oneof's name"))
        self.expect("{")
        while not self.accept("}"):
            tok = self.here()
            self.refuse(tok)
            if tok.text == "map" and self.next_is(1, "<"):
                raise self.fail(tok, "a map cannot be in a oneof")
            if not self.accept(";"):
                self.field(msg, scope, index)

    def map_field(self, msg: _Message, scope: str) -> None:
        self.expect("map")
        self.expect("<")
        key_tok = self.take()
        if key_tok.text not in MAP_KEYS:
            raise self.fail(key_tok, f"a map's key is an integer type, bool or string, not {key_tok.text!r}")
        self.expect(",")
        value_tok = self.here()
        value_type = self.dotted("the map's value type")
        self.expect(">")
        name_tok = self.here()
        f = msg.proto.field.add(label=FDP.LABEL_REPEATED, type=FDP.TYPE_MESSAGE)
        self.field_rest(msg, f, None, value_tok, scope)  # its type is the entry, below
        entry_name = map_entry_name(f.name)
        entry = msg.proto.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        full = self.declare(name_tok, scope, entry_name, "message")
        f.type_name = full
        entry.field.add(name="key", number=1, label=FDP.LABEL_OPTIONAL, type=SCALARS[key_tok.text],
                        json_name="key")
        value = entry.field.add(name="value", number=2, label=FDP.LABEL_OPTIONAL, json_name="value")
        if value_type in SCALARS:
            value.type = SCALARS[value_type]
        else:
            self.pending.append(_Pending(value, value_type, full, value_tok))

    def reserved(self, msg: _Message) -> None:
        self.expect("reserved")
        while True:
            tok = self.here()
            if tok.kind == "string":
                msg.proto.reserved_name.append(self.string("a reserved name"))
            else:
                start = self.integer("a reserved number")
                end = start
                if self.accept("to"):
                    end = MAX_FIELD_NUMBER if self.accept("max") else self.integer("the range's end")
                if not 1 <= start <= end <= MAX_FIELD_NUMBER:
                    raise self.fail(tok, f"reserved {start} to {end}: not a range of field numbers")
                msg.proto.reserved_range.add(start=start, end=end + 1)
            if not self.accept(","):
                break
        self.expect(";")

    # enums
    def enum(self, proto: descriptor_pb2.EnumDescriptorProto, scope: str) -> None:
        self.expect("enum")
        tok = self.here()
        proto.name = self.ident("the enum's name")
        self.declare(tok, scope, proto.name, "enum")
        self.expect("{")
        numbers: dict[int, str] = {}
        while not self.accept("}"):
            tok = self.here()
            if self.accept(";"):
                continue
            if tok.text == "option" and self.next_is(1, "allow_alias"):
                self.take()
                self.take()
                self.expect("=")
                proto.options.allow_alias = self.boolean("allow_alias")
                self.expect(";")
                continue
            if tok.text == "reserved":
                self._enum_reserved(proto)
                continue
            self.refuse(tok)
            value_tok = tok
            name = self.ident("an enum value's name")
            self.expect("=")
            number_tok = self.here()
            number = self.integer("the enum value's number", negative=True)
            if not proto.value and number != 0:
                raise self.fail(number_tok, f"{proto.name}: a proto3 enum's first value must be 0")
            if not -2 ** 31 <= number < 2 ** 31:
                raise self.fail(number_tok, f"{name}: enum values are 32-bit")
            if number in numbers and not proto.options.allow_alias:
                raise self.fail(number_tok, f"{name}: {number} is already {numbers[number]!r} "
                                            "(option allow_alias = true; permits it)")
            numbers.setdefault(number, name)
            self.declare(value_tok, scope, name, "value")  # C++ scoping: values are the enum's siblings
            value = proto.value.add(name=name, number=number)
            if self.accept("["):
                opt = self.here()
                if self.ident("an option") != "deprecated":
                    raise self.fail(opt, "an enum value takes only the option deprecated")
                self.expect("=")
                value.options.deprecated = self.boolean("deprecated")
                self.expect("]")
            self.expect(";")
        if not proto.value:
            raise self.fail(tok, f"{proto.name}: an enum needs at least one value")

    def _enum_reserved(self, proto: descriptor_pb2.EnumDescriptorProto) -> None:
        self.expect("reserved")
        while True:
            tok = self.here()
            if tok.kind == "string":
                proto.reserved_name.append(self.string("a reserved name"))
            else:
                start = self.integer("a reserved number", negative=True)
                end = (2 ** 31 - 1 if self.accept("max") else self.integer("the range's end", negative=True)) \
                    if self.accept("to") else start
                if not -2 ** 31 <= start <= end < 2 ** 31:
                    raise self.fail(tok, f"reserved {start} to {end}: not a range of 32-bit enum values")
                proto.reserved_range.add(start=start, end=end)  # enum ranges are inclusive
            if not self.accept(","):
                break
        self.expect(";")

    # names
    def resolve(self) -> None:
        """Every field's message or enum type by protobuf's scoping: the innermost scope first."""
        packages = set(self.imported_packages)
        parts = self.file.package.split(".") if self.file.package else []
        for i in range(1, len(parts) + 1):
            packages.add("." + ".".join(parts[:i]))
        for p in self.pending:
            full = self._lookup(p.type_name, p.scope, packages)
            if full is None:
                raise self.fail(p.token, f"field {p.field.name!r}: type {p.type_name!r} is not defined")
            kind = self.types.get(full)
            if kind not in ("message", "enum"):
                raise self.fail(p.token, f"field {p.field.name!r}: {p.type_name!r} is "
                                         f"{'an enum value' if kind else 'a package'}, not a type")
            if kind == "message" and p.field.options.HasField("packed"):
                raise self.fail(p.token, f"field {p.field.name!r}: packed is for repeated numbers, bools and enums")
            p.field.type_name = full
            p.field.type = FDP.TYPE_MESSAGE if kind == "message" else FDP.TYPE_ENUM

    def _lookup(self, name: str, scope: str, packages: set[str]) -> str | None:
        if name.startswith("."):
            return name if name in self.types else None
        first, _, rest = name.partition(".")
        while True:
            candidate = f"{scope}.{first}"
            if candidate in self.types or candidate in packages:
                full = f"{candidate}.{rest}" if rest else candidate
                return full if full in self.types or (not rest and full in packages) else None
            if not scope:
                return None
            scope = scope.rpartition(".")[0]


def _declared(messages: Any, enums: Any, scope: str) -> Iterator[tuple[str, str]]:
    """Every message, enum and enum value an imported file declares: (full name, kind)."""
    for e in enums:
        yield f"{scope}.{e.name}", "enum"
        for v in e.value:  # C++ scoping: an enum's values are its siblings
            yield f"{scope}.{v.name}", "value"
    for m in messages:
        full = f"{scope}.{m.name}"
        yield full, "message"
        yield from _declared(m.nested_type, m.enum_type, full)


def json_name(name: str) -> str:
    """protoc's JSON name of a field: underscores dropped, the letter after one upper-cased."""
    out, upper = [], False
    for c in name:
        if c == "_":
            upper = True
        else:
            out.append(c.upper() if upper else c)
            upper = False
    return "".join(out)


def map_entry_name(name: str) -> str:
    """protoc's name of a map field's entry message: `counts_by_name` -> `CountsByNameEntry`."""
    j = json_name(name)
    return j[:1].upper() + j[1:] + "Entry"


def read_schema(text: str) -> descriptor_pb2.FileDescriptorProto:
    """The schema's FileDescriptorProto, as protoc makes it (SchemaError names line and column)."""
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"line 1:1: the schema is longer than {MAX_SCHEMA_BYTES // 1024} KiB")
    return _Reader(text).read()


def read_schemas(texts: Mapping[str, str]) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Several files that import one another by the names they are given under (`import
    "name.proto";`), each as protoc makes it; SchemaError names the file, line and column."""
    done: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    reading: list[str] = []

    def read(name: str) -> descriptor_pb2.FileDescriptorProto | None:
        if name in done:
            return done[name]
        if name not in texts:
            return None
        if name in reading:
            raise SchemaError(f"{name}: imported by a file it imports ({' -> '.join([*reading, name])})")
        reading.append(name)
        text = texts[name]
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise SchemaError(f"{name}: line 1:1: longer than {MAX_SCHEMA_BYTES // 1024} KiB")
        try:
            done[name] = _Reader(text, name, read).read()
        except SchemaError as e:
            raise e if str(e).startswith(tuple(texts)) else SchemaError(f"{name}: {e}") from None
        reading.pop()
        return done[name]

    for name in texts:
        read(name)
    return {name: done[name] for name in texts}


def pool_of(texts: Mapping[str, str]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool holding a set of files (`read_schemas`), for `message_factory`."""
    files = read_schemas(texts)
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dep in files[name].dependency:
                add(dep)
            try:
                pool.Add(files[name])
            except (TypeError, ValueError) as e:
                raise SchemaError(f"{name}: {e}") from None
            added.add(name)

    for name in files:
        add(name)
    return pool


def message_class(text: str, message: str = "") -> type[Message]:
    """The class that decodes the schema's `message` (its name, or full name with the package),
    else its last top-level message, as ThingsBoard takes it."""
    file = read_schema(text)
    prefix = f"{file.package}." if file.package else ""
    defined = list(_all_messages(file, prefix))
    if not message:
        full = prefix + file.message_type[-1].name
    elif "." in message:
        full = message.lstrip(".")
    else:  # the outermost message of that name
        full = min((n for n in defined if n.rpartition(".")[2] == message), key=lambda n: n.count("."), default="")
    if full not in defined:
        raise UnknownMessage(f"{message!r} is not defined in the schema (it defines {', '.join(defined)})")
    pool = descriptor_pool.DescriptorPool()  # a pool per profile: two profiles may share names
    try:
        pool.Add(file)
    except (TypeError, ValueError) as e:  # what the runtime finds that the reader did not
        raise SchemaError(str(e)) from None
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full))


def _all_messages(file: descriptor_pb2.FileDescriptorProto, prefix: str) -> Iterator[str]:
    def walk(msgs: Any, scope: str) -> Iterator[str]:
        for m in msgs:
            yield f"{scope}{m.name}"
            yield from walk(m.nested_type, f"{scope}{m.name}.")

    yield from walk(file.message_type, prefix)
