# mongo-watcher on ECS Fargate: one task running every watcher of config_yaml (or, with
# leases_enabled, several tasks sharing them through the lease table), checkpointing in the
# DynamoDB table below, its control plane (GET /healthz, /readyz, /metrics, /watchers) behind
# an internal ALB.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.region

  # The port of http.listen (default 0.0.0.0:8080): container, target group, security groups.
  http_port = 8080

  tags = merge({ "app.kubernetes.io/name" = "mongo-watcher", Service = var.name }, var.tags)

  # The schema version of migrations/*.json, as `mongo-watcher migrate` tags the tables it
  # creates: a later `migrate` finds these tables up to date.
  schema_version_tag = { "mongo-watcher:schema-version" = "1" }
}

# Checkpoints: one item per watcher, string hash key `watcher`, as migrations/checkpoints.json.
resource "aws_dynamodb_table" "checkpoints" {
  name         = var.checkpoint_table_name
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "watcher"

  attribute {
    name = "watcher"
    type = "S"
  }

  # Losing the table loses every watcher's position (the next start falls back to start_at).
  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = var.checkpoint_table_kms_key_arn
  }

  deletion_protection_enabled = true

  tags = merge(local.tags, local.schema_version_tag)
}

# Leases (leases_enabled): one item per watcher (its owner, epoch, heartbeat counter) and one per
# live task, string hash key `watcher`, as migrations/leases.json.
resource "aws_dynamodb_table" "leases" {
  count = var.leases_enabled ? 1 : 0

  name         = var.lease_table_name
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "watcher"

  attribute {
    name = "watcher"
    type = "S"
  }

  # The items rebuild themselves within a ttl (the tasks claim free leases again); kept for
  # parity with the checkpoint table and the account's policies.
  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = var.lease_table_kms_key_arn
  }

  deletion_protection_enabled = true

  tags = merge(local.tags, local.schema_version_tag)
}

resource "aws_cloudwatch_log_group" "this" {
  name              = "/ecs/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.log_kms_key_arn

  tags = local.tags
}
