//! The Dockerfile cannot be built on the development machines (no container engine), so
//! what can be checked without one is checked here: a multi-stage build, a non-root final
//! user, the PostgreSQL client for the backup command, and a `.dockerignore` allowlist that
//! still lets the crate build (no build script, no file pulled in from outside `src/`).

use std::path::Path;

fn read(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_pg_client() {
    let text = read("Dockerfile");
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(froms[0].contains(" AS build"), "{froms:?}");
    let last_stage = text.rsplit_once("\nFROM ").expect("stages").1;
    let user = last_stage
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("a USER in the final stage");
    assert_eq!(user.trim(), "USER 65532:65532");
    assert!(
        last_stage.contains("postgresql-client-"),
        "pg_dump for backups"
    );
    assert!(last_stage.contains("COPY --from=build /out/dbpolicy /usr/local/bin/dbpolicy"));
    assert!(last_stage.contains(r#"ENTRYPOINT ["/usr/local/bin/dbpolicy"]"#));
    assert!(text.contains("cargo build --release --locked"));
}

#[test]
fn dockerignore_keeps_what_the_build_needs() {
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        rules,
        [
            "*",
            "!Cargo.toml",
            "!Cargo.lock",
            "!src/",
            "!tests/support/Cargo.toml"
        ]
    );
    // The test harness's manifest is there because cargo reads it; the Dockerfile copies it.
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("COPY tests/support/Cargo.toml ./tests/support/"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        !root.join("build.rs").exists(),
        "a build.rs would need a .dockerignore entry"
    );
    let manifest = read("Cargo.toml");
    assert!(
        !manifest.contains("build ="),
        "a build script would need a .dockerignore entry"
    );
    // Files compiled into the binary must come from src/ (tests may read anything).
    let mut stack = vec![root.join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                if (line.contains("include_str!") || line.contains("include_bytes!"))
                    && line.contains("CARGO_MANIFEST_DIR")
                {
                    panic!(
                        "{}: {line}: not in the image's build context",
                        path.display()
                    );
                }
            }
        }
    }
}
