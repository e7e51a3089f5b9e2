# Both roles are assumed by ECS tasks of this account only.
data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:*"]
    }
  }
}

# --- Task role: what mongo-watcher itself calls ------------------------------------------------

resource "aws_iam_role" "task" {
  name_prefix        = "${var.name}-task-"
  description        = "mongo-watcher: Kinesis PutRecords, DynamoDB checkpoints and leases, SSM secrets"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json

  tags = local.tags
}

data "aws_iam_policy_document" "task" {
  statement {
    sid       = "KinesisPut"
    actions   = ["kinesis:PutRecords", "kinesis:DescribeStreamSummary"]
    resources = var.kinesis_stream_arns
  }

  statement {
    sid = "DynamoDBCheckpoints"
    actions = [
      "dynamodb:GetItem",
      # Checkpoints of many watchers loaded 100 at a time at start (GetItem each without it).
      "dynamodb:BatchGetItem",
      "dynamodb:PutItem",
      "dynamodb:UpdateItem",
      "dynamodb:DescribeTable",
    ]
    resources = [aws_dynamodb_table.checkpoints.arn]
  }

  # leases_enabled: what watchers/src/lease.rs calls (check the table, read every lease, claim,
  # renew and release with conditional updates, remove the task's own item on SIGTERM).
  dynamic "statement" {
    for_each = var.leases_enabled ? [1] : []

    content {
      sid = "DynamoDBLeases"
      actions = [
        "dynamodb:DescribeTable",
        "dynamodb:Scan",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
      ]
      resources = [aws_dynamodb_table.leases[0].arn]
    }
  }

  dynamic "statement" {
    for_each = length(var.ssm_parameter_arns) > 0 ? [1] : []

    content {
      sid       = "SSMSecrets"
      actions   = ["ssm:GetParameter"]
      resources = var.ssm_parameter_arns
    }
  }

  # `on_oversized: s3`: the claim-checked events' objects, under the watchers' prefix only.
  dynamic "statement" {
    for_each = var.claim_check_bucket != null ? [1] : []

    content {
      sid       = "ClaimCheckObjects"
      actions   = ["s3:PutObject"]
      resources = ["arn:${local.partition}:s3:::${var.claim_check_bucket}/${var.claim_check_prefix}*"]
    }
  }

  dynamic "statement" {
    for_each = length(var.kms_key_arns) > 0 && length(var.ssm_parameter_arns) > 0 ? [1] : []

    content {
      sid       = "DecryptSSMSecrets"
      actions   = ["kms:Decrypt"]
      resources = var.kms_key_arns

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ssm.${local.region}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role_policy" "task" {
  name   = "mongo-watcher"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.task.json
}

# --- Execution role: what ECS needs to start the task (pull, logs, injected secrets) -----------

resource "aws_iam_role" "execution" {
  name_prefix        = "${var.name}-exec-"
  description        = "ECS task execution role of mongo-watcher"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json

  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "execution_secrets" {
  count = length(var.secret_environment) > 0 ? 1 : 0

  statement {
    sid       = "InjectedSecrets"
    actions   = ["ssm:GetParameters"]
    resources = values(var.secret_environment)
  }

  dynamic "statement" {
    for_each = length(var.kms_key_arns) > 0 ? [1] : []

    content {
      sid       = "DecryptInjectedSecrets"
      actions   = ["kms:Decrypt"]
      resources = var.kms_key_arns

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ssm.${local.region}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role_policy" "execution_secrets" {
  count = length(var.secret_environment) > 0 ? 1 : 0

  name   = "injected-secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution_secrets[0].json
}
