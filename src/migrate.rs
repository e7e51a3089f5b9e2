//! `mongo-watcher migrate`: the DynamoDB tables of `migrations/` (the checkpoint table and the
//! lease table), created or brought up to date idempotently; and `migrate import-marker`, which
//! copies the old tool's marker into a watcher's native checkpoint.
//!
//! The definitions are the files of `migrations/`, embedded at build time, so the binary
//! creates exactly what the AWS CLI would create from them. Each file carries its schema
//! version as the table tag `mongo-watcher:schema-version` (a tag, not a field of its own, so
//! the file stays valid `aws dynamodb create-table --cli-input-json` input); an existing table
//! is compared with its file by key schema (fixed for good: a wrong one is refused) and by
//! that tag (a missing or older one is brought up to date by the file's steps).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableDescription, TableStatus, Tag,
};
use bson::Bson;
use serde::Deserialize;
use watchers::checkpoint::{attr_to_bson, Checkpoint, CheckpointStore};

use crate::config::Config;

/// The table tag holding the schema version a table was created or last migrated to.
pub const VERSION_TAG: &str = "mongo-watcher:schema-version";

/// How often a table that is not ACTIVE yet is described again.
const POLL: Duration = Duration::from_secs(1);

/// One table definition of `migrations/` (the subset of CreateTable input it uses).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Definition {
    pub table_name: String,
    pub attribute_definitions: Vec<Attribute>,
    pub key_schema: Vec<Key>,
    pub billing_mode: String,
    pub tags: Vec<TagDef>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Attribute {
    pub attribute_name: String,
    pub attribute_type: String,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Key {
    pub attribute_name: String,
    pub key_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TagDef {
    pub key: String,
    pub value: String,
}

/// Which table a definition is for: its file and the config setting naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Checkpoints,
    Leases,
}

impl Role {
    fn file(self) -> &'static str {
        match self {
            Role::Checkpoints => "migrations/checkpoints.json",
            Role::Leases => "migrations/leases.json",
        }
    }

    fn setting(self) -> &'static str {
        match self {
            Role::Checkpoints => "checkpoints.table",
            Role::Leases => "leases.table",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Role::Checkpoints => include_str!("../migrations/checkpoints.json"),
            Role::Leases => include_str!("../migrations/leases.json"),
        }
    }

    /// The embedded definition (a unit test holds both files parseable).
    pub fn definition(self) -> anyhow::Result<Definition> {
        serde_json::from_str(self.text()).with_context(|| format!("{} is malformed", self.file()))
    }
}

impl Definition {
    /// The schema version of the file (its `mongo-watcher:schema-version` tag).
    pub fn version(&self) -> anyhow::Result<u32> {
        let tag = self
            .tags
            .iter()
            .find(|t| t.key == VERSION_TAG)
            .with_context(|| format!("no `{VERSION_TAG}` tag"))?;
        tag.value
            .parse()
            .with_context(|| format!("`{VERSION_TAG}` is not a number: {}", tag.value))
    }

    /// The key schema in words, e.g. "hash key `watcher` (S)".
    fn key_words(&self) -> String {
        let types: HashMap<&str, &str> = self
            .attribute_definitions
            .iter()
            .map(|a| (a.attribute_name.as_str(), a.attribute_type.as_str()))
            .collect();
        describe_keys(self.key_schema.iter().map(|k| {
            (
                k.key_type.as_str(),
                k.attribute_name.as_str(),
                types.get(k.attribute_name.as_str()).copied(),
            )
        }))
    }
}

fn describe_keys<'a>(keys: impl Iterator<Item = (&'a str, &'a str, Option<&'a str>)>) -> String {
    let words: Vec<String> = keys
        .map(|(kind, name, ty)| {
            let kind = if kind == "HASH" { "hash" } else { "range" };
            format!("{kind} key `{name}` ({})", ty.unwrap_or("?"))
        })
        .collect();
    if words.is_empty() {
        "no key".into()
    } else {
        words.join(", ")
    }
}

/// A table to migrate: its definition and the name it has in this deployment.
pub struct Target {
    pub role: Role,
    pub table: String,
}

impl Target {
    fn label(&self) -> String {
        format!("{} `{}`", self.role.setting(), self.table)
    }
}

/// The tables `migrate` works on: those the config names, or both under their files' names.
pub fn targets(cfg: Option<&Config>) -> anyhow::Result<Vec<Target>> {
    let Some(cfg) = cfg else {
        return [Role::Checkpoints, Role::Leases]
            .into_iter()
            .map(|role| {
                Ok(Target {
                    role,
                    table: role.definition()?.table_name,
                })
            })
            .collect();
    };
    let mut targets = Vec::new();
    if let Some(c) = &cfg.checkpoints {
        if c.layout != watchers::checkpoint::Layout::Native {
            bail!("checkpoints.table `{}` is the old tool's marker table; migrate manages only mongo-watcher's own tables", c.table);
        }
        targets.push(Target {
            role: Role::Checkpoints,
            table: c.table.clone(),
        });
    }
    if let Some(l) = &cfg.leases {
        targets.push(Target {
            role: Role::Leases,
            table: l.table.clone(),
        });
    }
    if targets.is_empty() {
        bail!("the config names no table (neither checkpoints.table nor leases.table): nothing to migrate");
    }
    Ok(targets)
}

/// The AWS SDK configuration of every command (`run` and `migrate`): the environment's
/// credentials, region and `AWS_ENDPOINT_URL`, a 5 s connect and a 30 s attempt timeout.
pub async fn aws() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await
}

/// Creates or updates every target; prints one line per table. The error lists every table
/// that failed, each with its problem.
pub async fn migrate(
    client: &aws_sdk_dynamodb::Client,
    targets: &[Target],
    dry_run: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for target in targets {
        match migrate_one(client, target, dry_run, timeout).await {
            Ok(outcome) => println!("{}: {outcome}", target.label()),
            Err(e) => {
                eprintln!("{}: {e:#}", target.label());
                problems.push(target.label());
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("migration failed for {}", problems.join(", "))
    }
}

async fn migrate_one(
    client: &aws_sdk_dynamodb::Client,
    target: &Target,
    dry_run: bool,
    timeout: Duration,
) -> anyhow::Result<String> {
    let def = target.role.definition()?;
    let version = def.version()?;
    let Some(table) = describe(client, &target.table).await? else {
        if dry_run {
            return Ok(format!(
                "missing; would create it ({}, {}, schema version {version}) and wait until ACTIVE",
                def.key_words(),
                def.billing_mode
            ));
        }
        create(client, &target.table, &def).await?;
        wait_active(client, &target.table, timeout).await?;
        return Ok(format!(
            "created ({}, {}, schema version {version}), ACTIVE",
            def.key_words(),
            def.billing_mode
        ));
    };
    check_keys(&table, &def, target.role)?;
    if table.table_status() != Some(&TableStatus::Active) && !dry_run {
        wait_active(client, &target.table, timeout).await?;
    }
    let arn = table
        .table_arn()
        .with_context(|| "DescribeTable returned no table ARN")?;
    let found = stored_version(client, arn).await?;
    match found {
        Some(v) if v == version => Ok(format!("up to date (schema version {version})")),
        Some(v) if v > version => bail!(
            "the table is at schema version {v}, newer than this mongo-watcher's {version} \
             ({}); run a newer mongo-watcher's migrate",
            target.role.file()
        ),
        _ => {
            let from = found.map_or_else(
                || "no version tag".to_owned(),
                |v| format!("schema version {v}"),
            );
            if dry_run {
                return Ok(format!(
                    "key schema matches; would update it from {from} to {version}"
                ));
            }
            // Version 1 is the key schema alone, checked above: updating to it records the
            // version. A later version adds its steps here, each idempotent.
            client
                .tag_resource()
                .resource_arn(arn)
                .tags(version_tag(version)?)
                .send()
                .await
                .map_err(|e| aws_error("TagResource", e))?;
            wait_active(client, &target.table, timeout).await?;
            Ok(format!(
                "updated from {from} to schema version {version}, ACTIVE"
            ))
        }
    }
}

/// The table's description, `None` when it does not exist.
async fn describe(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> anyhow::Result<Option<TableDescription>> {
    match client.describe_table().table_name(table).send().await {
        Ok(out) => Ok(out.table().cloned()),
        Err(SdkError::ServiceError(e)) if e.err().is_resource_not_found_exception() => Ok(None),
        Err(e) => Err(aws_error("DescribeTable", e)),
    }
}

fn check_keys(table: &TableDescription, def: &Definition, role: Role) -> anyhow::Result<()> {
    let types: HashMap<&str, &str> = table
        .attribute_definitions()
        .iter()
        .map(|a| (a.attribute_name(), a.attribute_type().as_str()))
        .collect();
    let found: Vec<(&str, &str, Option<&str>)> = table
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.key_type().as_str(),
                k.attribute_name(),
                types.get(k.attribute_name()).copied(),
            )
        })
        .collect();
    let want: Vec<(&str, &str, Option<&str>)> = {
        let types: HashMap<&str, &str> = def
            .attribute_definitions
            .iter()
            .map(|a| (a.attribute_name.as_str(), a.attribute_type.as_str()))
            .collect();
        def.key_schema
            .iter()
            .map(|k| {
                (
                    k.key_type.as_str(),
                    k.attribute_name.as_str(),
                    types.get(k.attribute_name.as_str()).copied(),
                )
            })
            .collect()
    };
    if found != want {
        bail!(
            "the table exists with {}, but mongo-watcher needs exactly {} ({}); a key schema \
             cannot be changed: point {} at another table (migrate creates it) or delete this one",
            describe_keys(found.into_iter()),
            def.key_words(),
            role.file(),
            role.setting()
        );
    }
    Ok(())
}

async fn create(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    def: &Definition,
) -> anyhow::Result<()> {
    let mut req = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::from(def.billing_mode.as_str()));
    for a in &def.attribute_definitions {
        req = req.attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(&a.attribute_name)
                .attribute_type(ScalarAttributeType::from(a.attribute_type.as_str()))
                .build()?,
        );
    }
    for k in &def.key_schema {
        req = req.key_schema(
            KeySchemaElement::builder()
                .attribute_name(&k.attribute_name)
                .key_type(KeyType::from(k.key_type.as_str()))
                .build()?,
        );
    }
    for t in &def.tags {
        req = req.tags(Tag::builder().key(&t.key).value(&t.value).build()?);
    }
    match req.send().await {
        Ok(_) => Ok(()),
        // Another migrate created it meanwhile: waiting for ACTIVE is all that is left.
        Err(SdkError::ServiceError(e)) if e.err().is_resource_in_use_exception() => Ok(()),
        Err(e) => Err(aws_error("CreateTable", e)),
    }
}

fn version_tag(version: u32) -> anyhow::Result<Tag> {
    Ok(Tag::builder()
        .key(VERSION_TAG)
        .value(version.to_string())
        .build()?)
}

/// The `mongo-watcher:schema-version` tag of the table, `None` when it has none.
async fn stored_version(
    client: &aws_sdk_dynamodb::Client,
    arn: &str,
) -> anyhow::Result<Option<u32>> {
    let mut next = None;
    loop {
        let out = client
            .list_tags_of_resource()
            .resource_arn(arn)
            .set_next_token(next)
            .send()
            .await
            .map_err(|e| aws_error("ListTagsOfResource", e))?;
        if let Some(tag) = out.tags().iter().find(|t| t.key() == VERSION_TAG) {
            let v = tag.value().parse().with_context(|| {
                format!(
                    "tag `{VERSION_TAG}` is `{}`, not a version number",
                    tag.value()
                )
            })?;
            return Ok(Some(v));
        }
        match out.next_token() {
            Some(token) => next = Some(token.to_owned()),
            None => return Ok(None),
        }
    }
}

/// Polls DescribeTable until the table (and its indexes) is ACTIVE, or `timeout` passes.
async fn wait_active(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = describe(client, table)
            .await?
            .and_then(|t| t.table_status().cloned());
        if status == Some(TableStatus::Active) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "not ACTIVE after {} (status {}); run migrate again to keep waiting",
                humantime::format_duration(timeout),
                status.map_or_else(
                    || "none: the table is gone".to_owned(),
                    |s| s.as_str().to_owned()
                )
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// An AWS failure in words: the operation, the service's code and message.
fn aws_error<E, R>(operation: &str, err: SdkError<E, R>) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let said = match &err {
        SdkError::ServiceError(e) => match (e.err().code(), e.err().message()) {
            (Some("AccessDeniedException"), _) => format!(
                "access denied: grant `dynamodb:{operation}` on the table to the role running migrate"
            ),
            (Some(code), Some(m)) if !m.is_empty() => format!("{code}: {m}"),
            (Some(code), _) => code.to_owned(),
            _ => DisplayErrorContext(&err).to_string(),
        },
        _ => DisplayErrorContext(&err).to_string(),
    };
    anyhow::anyhow!("{operation} failed: {said}")
}

/// What `migrate import-marker` was asked to do.
pub struct ImportMarker {
    /// The old tool's marker table (hash key `collectionName`).
    pub table: String,
    /// `database.collection`: the marker's key.
    pub collection: String,
    /// The watcher of the config whose checkpoint the marker becomes.
    pub watcher: String,
    /// Replace an existing checkpoint.
    pub force: bool,
}

/// Copies the old tool's marker (`_id` of the item keyed `collectionName` = `db.coll` in the
/// marker table) into `watcher`'s checkpoint in the config's checkpoint table; returns what was
/// done, in words.
pub async fn import_marker(
    client: &aws_sdk_dynamodb::Client,
    cfg: &Config,
    args: &ImportMarker,
) -> anyhow::Result<String> {
    let checkpoints = cfg
        .checkpoints
        .as_ref()
        .context("the config has no checkpoints.table to import into")?;
    let Some(spec) = cfg.watchers.iter().find(|w| w.name == args.watcher) else {
        let names: Vec<&str> = cfg.watchers.iter().map(|w| w.name.as_str()).collect();
        bail!(
            "watcher `{}` is not in the config (its watchers: {})",
            args.watcher,
            names.join(", ")
        );
    };
    let namespace = watchers::checkpoint::namespace(spec);
    if namespace != args.collection {
        bail!(
            "watcher `{}` watches `{namespace}`, not `{}`: a resume token of another collection \
             cannot be resumed on",
            args.watcher,
            args.collection
        );
    }
    let token = read_marker(client, &args.table, &args.collection).await?;

    let store = CheckpointStore::new(client.clone(), checkpoints.table.clone());
    store
        .verify_table()
        .await
        .with_context(|| format!("checkpoints.table `{}`", checkpoints.table))?;
    let existing = store
        .load(&args.watcher)
        .await
        .with_context(|| format!("checkpoints.table `{}`", checkpoints.table))?;
    let expected = match existing {
        Some(stored) if !args.force => bail!(
            "watcher `{}` already has a checkpoint in `{}` (revision {}, written {}); it was \
             not replaced. Pass --force to replace it (stop every replica running the \
             watcher first)",
            args.watcher,
            checkpoints.table,
            stored.revision,
            stored.updated_at.as_deref().unwrap_or("at an unknown time")
        ),
        Some(stored) => Some(stored.revision),
        None => None,
    };
    let checkpoint = Checkpoint {
        token: Some(token),
        cluster_time: None,
        paused: false,
        namespace: Some(args.collection.clone()),
    };
    let revision = store
        .save(&args.watcher, expected, &checkpoint, None)
        .await
        .with_context(|| format!("checkpoints.table `{}`", checkpoints.table))?;
    Ok(format!(
        "imported the marker of `{}` from `{}` as watcher `{}`'s checkpoint in `{}` (revision \
         {revision}{}): it resumes right after the old tool's last delivered event",
        args.collection,
        args.table,
        args.watcher,
        checkpoints.table,
        if expected.is_some() {
            ", replacing the one stored"
        } else {
            ""
        }
    ))
}

/// The resume token of the old tool's marker, as the document it wrote (`{_data: ...}`).
async fn read_marker(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    collection: &str,
) -> anyhow::Result<Bson> {
    let out = match client
        .get_item()
        .table_name(table)
        .key("collectionName", AttributeValue::S(collection.to_owned()))
        .consistent_read(true)
        .send()
        .await
    {
        Ok(out) => out,
        Err(SdkError::ServiceError(e)) if e.err().is_resource_not_found_exception() => {
            bail!("marker table `{table}` does not exist")
        }
        Err(e) => {
            return Err(aws_error("GetItem", e)).with_context(|| {
                format!(
                "marker table `{table}` (the old tool's table has hash key `collectionName` (S))"
            )
            })
        }
    };
    let Some(item) = out.item() else {
        bail!("marker table `{table}` has no marker for `{collection}` (no item with collectionName = \"{collection}\")");
    };
    let Some(id) = item.get("_id") else {
        bail!("the marker of `{collection}` in `{table}` has no `_id` (the old tool never wrote a position)");
    };
    let token = attr_to_bson(id)
        .map_err(|m| anyhow::anyhow!("the marker of `{collection}` in `{table}`: `_id` {m}"))?;
    match &token {
        Bson::Document(d) if d.get_str("_data").is_ok() => Ok(token),
        _ => bail!(
            "the marker of `{collection}` in `{table}`: `_id` is not a resume token (a map with \
             a string `_data`)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_definitions_parse_and_are_versioned() {
        for role in [Role::Checkpoints, Role::Leases] {
            let def = role.definition().expect("parses");
            assert!(def.version().expect("version") >= 1, "{}", role.file());
            assert_eq!(def.key_words(), "hash key `watcher` (S)", "{}", role.file());
            assert_eq!(def.billing_mode, "PAY_PER_REQUEST");
        }
        assert_eq!(
            Role::Leases.definition().unwrap().table_name,
            "mongo-watcher-leases"
        );
    }
}
