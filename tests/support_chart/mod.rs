//! A small renderer for the subset of Helm's Go templates that `charts/dbpolicy` uses (Helm
//! itself cannot be installed from the package registries reachable here).
//!
//! Supported: text with `{{ }}` actions and `{{-`/`-}}` whitespace trimming, comments,
//! `define`/`include`, `if`/`else if`/`else`, `with`/`else`, `range` over lists, pipelines
//! with `|`, parenthesised sub-pipelines, `.`, `$`, field chains, string/number/bool
//! literals and the functions listed in [`call`]. Anything else is an error naming the
//! template, so a chart change that needs more fails loudly here instead of rendering
//! wrongly.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Output(String),
    If(Vec<(String, Vec<Node>)>, Vec<Node>),
    With(String, Vec<Node>, Vec<Node>),
    Range(String, Vec<Node>),
}

/// One action or text piece from the lexer.
#[derive(Debug, Clone)]
enum Tok {
    Text(String),
    Action(String),
}

fn lex(src: &str, name: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = rest[..start].to_owned();
        if trim_next {
            text = text.trim_start().to_owned();
        }
        let after = &rest[start + 2..];
        let trim_left = after.starts_with('-') && after[1..].starts_with(char::is_whitespace);
        if trim_left {
            text = text.trim_end().to_owned();
        }
        toks.push(Tok::Text(text));
        let body_start = if trim_left { 1 } else { 0 };
        let end = after
            .find("}}")
            .ok_or_else(|| format!("{name}: unclosed action"))?;
        let mut body = &after[body_start..end];
        trim_next = body.ends_with(" -") || body.ends_with("\t-") || body.ends_with("\n-");
        if trim_next {
            body = &body[..body.len() - 1];
        }
        let body = body.trim();
        if !(body.starts_with("/*") && body.ends_with("*/")) {
            toks.push(Tok::Action(body.to_owned()));
        }
        rest = &after[end + 2..];
    }
    let mut text = rest.to_owned();
    if trim_next {
        text = text.trim_start().to_owned();
    }
    toks.push(Tok::Text(text));
    Ok(toks)
}

/// Parses until one of `stops` (an action keyword), returning the nodes and the stop seen.
fn parse_nodes(
    toks: &[Tok],
    pos: &mut usize,
    defines: &mut BTreeMap<String, Vec<Node>>,
    stops: &[&str],
    name: &str,
) -> Result<(Vec<Node>, Option<String>), String> {
    let mut nodes = Vec::new();
    while *pos < toks.len() {
        let tok = toks[*pos].clone();
        *pos += 1;
        match tok {
            Tok::Text(t) => {
                if !t.is_empty() {
                    nodes.push(Node::Text(t));
                }
            }
            Tok::Action(a) => {
                let (kw, rest) = match a.split_once(char::is_whitespace) {
                    Some((k, r)) => (k.to_owned(), r.trim().to_owned()),
                    None => (a.clone(), String::new()),
                };
                if stops.iter().any(|s| *s == kw) {
                    return Ok((nodes, Some(a)));
                }
                match kw.as_str() {
                    "define" => {
                        let dname =
                            unquote(&rest).ok_or_else(|| format!("{name}: bad define {rest}"))?;
                        let (body, _) = expect_end(toks, pos, defines, name)?;
                        defines.insert(dname, body);
                    }
                    "if" => {
                        let mut branches = Vec::new();
                        let mut cond = rest;
                        loop {
                            let (body, stop) =
                                parse_nodes(toks, pos, defines, &["else", "end"], name)?;
                            branches.push((cond.clone(), body));
                            let stop = stop.ok_or_else(|| format!("{name}: if without end"))?;
                            if stop == "end" {
                                nodes.push(Node::If(branches, Vec::new()));
                                break;
                            }
                            let tail = stop.trim_start_matches("else").trim();
                            if let Some(c) = tail.strip_prefix("if ") {
                                cond = c.trim().to_owned();
                                continue;
                            }
                            let (els, _) = expect_end(toks, pos, defines, name)?;
                            nodes.push(Node::If(branches, els));
                            break;
                        }
                    }
                    "with" => {
                        let (body, stop) = parse_nodes(toks, pos, defines, &["else", "end"], name)?;
                        let els = match stop.as_deref() {
                            Some("end") => Vec::new(),
                            Some("else") => expect_end(toks, pos, defines, name)?.0,
                            _ => return Err(format!("{name}: with without end")),
                        };
                        nodes.push(Node::With(rest, body, els));
                    }
                    "range" => {
                        if rest.contains(":=") {
                            return Err(format!("{name}: range with variables is not supported"));
                        }
                        let (body, _) = expect_end(toks, pos, defines, name)?;
                        nodes.push(Node::Range(rest, body));
                    }
                    "else" | "end" => return Err(format!("{name}: unexpected {a}")),
                    "template" | "block" => {
                        return Err(format!("{name}: {kw} is not supported, use include"))
                    }
                    _ => nodes.push(Node::Output(a)),
                }
            }
        }
    }
    Ok((nodes, None))
}

fn expect_end(
    toks: &[Tok],
    pos: &mut usize,
    defines: &mut BTreeMap<String, Vec<Node>>,
    name: &str,
) -> Result<(Vec<Node>, String), String> {
    let (body, stop) = parse_nodes(toks, pos, defines, &["end"], name)?;
    Ok((body, stop.ok_or_else(|| format!("{name}: missing end"))?))
}

fn unquote(s: &str) -> Option<String> {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        serde_json::from_str(s).ok()
    } else {
        None
    }
}

/// A chart: its templates parsed, its defined named templates, Chart.yaml and values.yaml.
pub struct Chart {
    files: Vec<(String, Vec<Node>)>,
    defines: BTreeMap<String, Vec<Node>>,
    pub chart: Value,
    pub values: Value,
}

pub struct Release<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
}

impl Chart {
    pub fn load(dir: &Path) -> Result<Chart, String> {
        let read =
            |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
        let chart_yaml: Value = serde_yaml::from_str(&read(&dir.join("Chart.yaml"))?)
            .map_err(|e| format!("Chart.yaml: {e}"))?;
        let values: Value = serde_yaml::from_str(&read(&dir.join("values.yaml"))?)
            .map_err(|e| format!("values.yaml: {e}"))?;
        // Helm exposes Chart.yaml's fields capitalised: .Chart.Name, .Chart.AppVersion.
        let mut chart = Map::new();
        for (k, v) in chart_yaml.as_object().ok_or("Chart.yaml is not a map")? {
            let mut c = k.chars();
            let cap: String = c
                .next()
                .map(|f| f.to_ascii_uppercase())
                .into_iter()
                .chain(c)
                .collect();
            chart.insert(cap, v.clone());
        }
        let mut paths: Vec<_> = std::fs::read_dir(dir.join("templates"))
            .map_err(|e| format!("templates/: {e}"))?
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        let mut defines = BTreeMap::new();
        let mut files = Vec::new();
        for p in paths {
            let name = format!("templates/{}", p.file_name().unwrap().to_string_lossy());
            let toks = lex(&read(&p)?, &name)?;
            let mut pos = 0;
            let (nodes, stop) = parse_nodes(&toks, &mut pos, &mut defines, &[], &name)?;
            if let Some(s) = stop {
                return Err(format!("{name}: stray {s}"));
            }
            files.push((name, nodes));
        }
        Ok(Chart {
            files,
            defines,
            chart: Value::Object(chart),
            values,
        })
    }

    /// Renders every template (not `_*.tpl`) with values.yaml merged with `overrides`;
    /// returns (file name, rendered text).
    pub fn render(
        &self,
        release: &Release,
        overrides: &Value,
    ) -> Result<Vec<(String, String)>, String> {
        let mut values = self.values.clone();
        merge(&mut values, overrides);
        let root = serde_json::json!({
            "Values": values,
            "Chart": self.chart,
            "Release": {"Name": release.name, "Namespace": release.namespace, "Service": "Helm",
                        "IsInstall": true, "IsUpgrade": false},
            "Capabilities": {"KubeVersion": {"Version": "v1.30.0"}},
        });
        let mut out = Vec::new();
        for (name, nodes) in &self.files {
            let base = name.rsplit('/').next().unwrap();
            if base.starts_with('_') {
                continue;
            }
            let mut s = String::new();
            let ctx = Ctx {
                chart: self,
                root: &root,
                file: name,
            };
            ctx.exec(nodes, &root, &mut s)?;
            out.push((name.clone(), s));
        }
        Ok(out)
    }

    /// The rendered manifests (NOTES.txt excluded) parsed as YAML documents; empty
    /// documents dropped.
    pub fn manifests(&self, release: &Release, overrides: &Value) -> Result<Vec<Value>, String> {
        let mut docs = Vec::new();
        for (name, text) in self.render(release, overrides)? {
            if name.ends_with("NOTES.txt") {
                continue;
            }
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(doc)
                    .map_err(|e| format!("{name} renders invalid YAML: {e}\n{text}"))?;
                if !v.is_null() {
                    docs.push(v);
                }
            }
        }
        Ok(docs)
    }
}

/// Deep merge, as Helm merges `--set`/`-f` values over values.yaml.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(bv) if bv.is_object() && v.is_object() => merge(bv, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Go's default formatting of a value in `{{ }}` output.
fn display(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

struct Ctx<'a> {
    chart: &'a Chart,
    root: &'a Value,
    file: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
enum Arg {
    Field(Vec<String>, bool), // path, from root ($)
    Lit(Value),
    Ident(String),
    Sub(String),
}

impl Ctx<'_> {
    fn exec(&self, nodes: &[Node], dot: &Value, out: &mut String) -> Result<(), String> {
        for n in nodes {
            match n {
                Node::Text(t) => out.push_str(t),
                Node::Output(p) => out.push_str(&display(&self.pipeline(p, dot)?)),
                Node::If(branches, els) => {
                    let mut done = false;
                    for (cond, body) in branches {
                        if truthy(&self.pipeline(cond, dot)?) {
                            self.exec(body, dot, out)?;
                            done = true;
                            break;
                        }
                    }
                    if !done {
                        self.exec(els, dot, out)?;
                    }
                }
                Node::With(p, body, els) => {
                    let v = self.pipeline(p, dot)?;
                    if truthy(&v) {
                        self.exec(body, &v, out)?;
                    } else {
                        self.exec(els, dot, out)?;
                    }
                }
                Node::Range(p, body) => match self.pipeline(p, dot)? {
                    Value::Array(items) => {
                        for item in &items {
                            self.exec(body, item, out)?;
                        }
                    }
                    Value::Null => {}
                    other => return Err(format!("{}: range over {other}", self.file)),
                },
            }
        }
        Ok(())
    }

    fn err(&self, msg: impl std::fmt::Display) -> String {
        format!("{}: {msg}", self.file)
    }

    fn pipeline(&self, src: &str, dot: &Value) -> Result<Value, String> {
        let mut acc: Option<Value> = None;
        for cmd in split_top(src, '|') {
            let args = self.tokenize(cmd.trim())?;
            acc = Some(self.command(&args, acc, dot)?);
        }
        acc.ok_or_else(|| self.err(format!("empty pipeline in {src:?}")))
    }

    fn command(&self, args: &[Arg], piped: Option<Value>, dot: &Value) -> Result<Value, String> {
        let (first, rest) = args
            .split_first()
            .ok_or_else(|| self.err("empty command"))?;
        if let Arg::Ident(f) = first {
            let mut vals = rest
                .iter()
                .map(|a| self.arg(a, dot))
                .collect::<Result<Vec<_>, _>>()?;
            vals.extend(piped);
            return self.call(f, vals, dot);
        }
        if !rest.is_empty() || piped.is_some() {
            return Err(self.err(format!("{first:?} is not a function")));
        }
        self.arg(first, dot)
    }

    fn arg(&self, a: &Arg, dot: &Value) -> Result<Value, String> {
        match a {
            Arg::Lit(v) => Ok(v.clone()),
            Arg::Sub(p) => self.pipeline(p, dot),
            Arg::Ident(f) => self.call(f, Vec::new(), dot),
            Arg::Field(path, from_root) => {
                let mut v = if *from_root { self.root } else { dot };
                for seg in path {
                    v = match v.get(seg) {
                        Some(x) => x,
                        None => return Ok(Value::Null),
                    };
                }
                Ok(v.clone())
            }
        }
    }

    fn tokenize(&self, s: &str) -> Result<Vec<Arg>, String> {
        let mut out = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let c = b[i] as char;
            if c.is_whitespace() {
                i += 1;
                continue;
            }
            if c == '"' {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    if b[j] == b'\\' {
                        j += 1;
                    }
                    j += 1;
                }
                let lit: String = serde_json::from_str(&s[i..=j.min(b.len() - 1)])
                    .map_err(|e| self.err(format!("string literal in {s:?}: {e}")))?;
                out.push(Arg::Lit(Value::String(lit)));
                i = j + 1;
                continue;
            }
            if c == '(' {
                let mut depth = 0;
                let mut j = i;
                loop {
                    match b.get(j) {
                        Some(b'(') => depth += 1,
                        Some(b')') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        Some(_) => {}
                        None => return Err(self.err(format!("unbalanced ( in {s:?}"))),
                    }
                    j += 1;
                }
                out.push(Arg::Sub(s[i + 1..j].to_owned()));
                i = j + 1;
                continue;
            }
            let mut j = i;
            while j < b.len() && !(b[j] as char).is_whitespace() && b[j] != b'(' {
                j += 1;
            }
            let word = &s[i..j];
            i = j;
            out.push(if word == "." {
                Arg::Field(Vec::new(), false)
            } else if word == "$" {
                Arg::Field(Vec::new(), true)
            } else if let Some(p) = word.strip_prefix("$.") {
                Arg::Field(p.split('.').map(str::to_owned).collect(), true)
            } else if let Some(p) = word.strip_prefix('.') {
                Arg::Field(p.split('.').map(str::to_owned).collect(), false)
            } else if word == "true" || word == "false" {
                Arg::Lit(Value::Bool(word == "true"))
            } else if let Ok(n) = word.parse::<i64>() {
                Arg::Lit(n.into())
            } else if word.chars().all(|c| c.is_ascii_alphanumeric()) {
                Arg::Ident(word.to_owned())
            } else {
                return Err(self.err(format!("unsupported token {word:?} in {s:?}")));
            });
        }
        Ok(out)
    }

    fn call(&self, f: &str, a: Vec<Value>, dot: &Value) -> Result<Value, String> {
        let n = a.len();
        let want = |k: usize| -> Result<(), String> {
            if n == k {
                Ok(())
            } else {
                Err(self.err(format!("{f} takes {k} arguments, got {n}: {a:?}")))
            }
        };
        let s = |v: &Value| display(v);
        let int = |v: &Value| {
            v.as_i64()
                .ok_or_else(|| self.err(format!("{f}: {v} is not an integer")))
        };
        Ok(match f {
            "include" => {
                want(2)?;
                let name = s(&a[0]);
                let body =
                    self.chart.defines.get(&name).ok_or_else(|| {
                        self.err(format!("include of undefined template {name:?}"))
                    })?;
                let mut out = String::new();
                self.exec(body, &a[1], &mut out)?;
                Value::String(out)
            }
            "default" => {
                want(2)?;
                if truthy(&a[1]) {
                    a[1].clone()
                } else {
                    a[0].clone()
                }
            }
            "quote" => {
                want(1)?;
                Value::String(serde_json::to_string(&s(&a[0])).unwrap())
            }
            "toYaml" => {
                want(1)?;
                let y = serde_yaml::to_string(&a[0]).map_err(|e| self.err(e))?;
                Value::String(y.trim_end_matches('\n').to_owned())
            }
            "indent" | "nindent" => {
                want(2)?;
                let pad = " ".repeat(int(&a[0])? as usize);
                let body = s(&a[1])
                    .lines()
                    .map(|l| format!("{pad}{l}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                Value::String(if f == "nindent" {
                    format!("\n{body}")
                } else {
                    body
                })
            }
            "trunc" => {
                want(2)?;
                Value::String(s(&a[1]).chars().take(int(&a[0])? as usize).collect())
            }
            "trimSuffix" => {
                want(2)?;
                let v = s(&a[1]);
                Value::String(v.strip_suffix(s(&a[0]).as_str()).unwrap_or(&v).to_owned())
            }
            "replace" => {
                want(3)?;
                Value::String(s(&a[2]).replace(&s(&a[0]), &s(&a[1])))
            }
            "contains" => {
                want(2)?;
                Value::Bool(s(&a[1]).contains(&s(&a[0])))
            }
            "printf" => {
                let fmt = s(a.first().ok_or_else(|| self.err("printf without format"))?);
                let mut args = a[1..].iter();
                let mut out = String::new();
                let mut chars = fmt.chars();
                while let Some(c) = chars.next() {
                    if c != '%' {
                        out.push(c);
                        continue;
                    }
                    match chars.next() {
                        Some('s' | 'd' | 'v') => out.push_str(&s(args
                            .next()
                            .ok_or_else(|| self.err("printf: too few arguments"))?)),
                        Some('%') => out.push('%'),
                        other => return Err(self.err(format!("printf verb %{other:?}"))),
                    }
                }
                Value::String(out)
            }
            "not" => {
                want(1)?;
                Value::Bool(!truthy(&a[0]))
            }
            "eq" => {
                want(2)?;
                Value::Bool(a[0] == a[1])
            }
            "ne" => {
                want(2)?;
                Value::Bool(a[0] != a[1])
            }
            "and" => a
                .iter()
                .find(|v| !truthy(v))
                .or(a.last())
                .cloned()
                .unwrap_or(Value::Null),
            "or" => a
                .iter()
                .find(|v| truthy(v))
                .or(a.last())
                .cloned()
                .unwrap_or(Value::Null),
            "fail" => return Err(self.err(format!("fail: {}", s(&a[0])))),
            "required" => {
                want(2)?;
                if !truthy(&a[1]) {
                    return Err(self.err(format!("required: {}", s(&a[0]))));
                }
                a[1].clone()
            }
            _ => {
                let _ = dot;
                return Err(self.err(format!(
                    "function {f:?} is not supported by the test renderer"
                )));
            }
        })
    }
}

/// Splits at `sep` outside strings and parentheses.
fn split_top(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut in_str, mut esc, mut start) = (0i32, false, false, 0);
    for (i, c) in s.char_indices() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '(' => depth += 1,
            ')' => depth -= 1,
            c if c == sep && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A small JSON-schema check of chart values against values.schema.json, as `helm install`
/// does: type, properties, required, additionalProperties, items, enum, minimum, maximum and
/// minLength (not `pattern`). Errors are pushed to `errors`.
pub fn check_schema(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{path}: expected {t}, got {v}"));
            return;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errors.push(format!("{path}: {v} is not one of {e:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < min {
            errors.push(format!("{path}: {n} < minimum {min}"));
        }
    }
    if let (Some(max), Some(n)) = (schema.get("maximum").and_then(Value::as_f64), v.as_f64()) {
        if n > max {
            errors.push(format!("{path}: {n} > maximum {max}"));
        }
    }
    if let (Some(min), Some(s)) = (schema.get("minLength").and_then(Value::as_u64), v.as_str()) {
        if (s.chars().count() as u64) < min {
            errors.push(format!("{path}: shorter than {min}"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !obj.contains_key(r) {
                errors.push(format!("{path}: missing required {r}"));
            }
        }
        for (k, val) in obj {
            let sub = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => check_schema(s, val, &sub, errors),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => errors.push(format!("{sub}: not allowed")),
                    Some(s @ Value::Object(_)) => check_schema(s, val, &sub, errors),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            check_schema(items, item, &format!("{path}[{i}]"), errors);
        }
    }
}

/// The chart's ServiceAccount, ClusterRole and ClusterRoleBinding (rendered from
/// charts/dbpolicy with default values) applied to the server; returns a kubeconfig that
/// acts as that ServiceAccount.
pub fn install_rbac(env: &crate::support_envtest::Envtest) -> std::path::PathBuf {
    const RELEASE_NS: &str = "dbpolicy-system";
    let chart = Chart::load(&crate::support_envtest::repo_root().join("charts/dbpolicy"))
        .expect("load the chart");
    let release = Release {
        name: "dbpolicy",
        namespace: RELEASE_NS,
    };
    let rbac: Vec<serde_json::Value> = chart
        .manifests(&release, &serde_json::json!({}))
        .expect("render the chart")
        .into_iter()
        .filter(|d| {
            ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
                .contains(&d["kind"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(rbac.len(), 3, "the chart's RBAC objects");
    env.kubectl_ok(&["create", "namespace", RELEASE_NS], None);
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    env.kubectl_ok(&["apply", "-f", "-"], Some(&list.to_string()));
    env.kubeconfig_for_service_account(RELEASE_NS, "dbpolicy")
}
