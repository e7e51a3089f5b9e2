# mongo-watcher on ECS Fargate: one task running every watcher of config_yaml, checkpointing in
# the DynamoDB table below, its control plane (GET /healthz, /readyz, /metrics, /watchers)
# behind an internal ALB.

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

  tags = local.tags
}

resource "aws_cloudwatch_log_group" "this" {
  name              = "/ecs/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.log_kms_key_arn

  tags = local.tags
}
