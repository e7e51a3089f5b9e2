variable "name" {
  description = "Name of the ECS service, task family, roles, security groups and log group."
  type        = string
  default     = "mongo-watcher"

  validation {
    condition     = can(regex("^[a-zA-Z0-9-]{1,28}$", var.name))
    error_message = "name: 1 to 28 letters, digits or dashes (it prefixes the target group's 32-character name)."
  }
}

variable "image" {
  description = "mongo-watcher image, e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/mongo-watcher:0.1.0 (or @sha256:...)."
  type        = string
}

variable "init_image" {
  description = "Image of the init container that writes the config file; it needs only `sh` and `printf`."
  type        = string
  default     = "public.ecr.aws/docker/library/busybox:1.37"
}

variable "ecs_cluster_arn" {
  description = "ARN of the existing ECS cluster to run the Fargate service in."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the tasks and the load balancer."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the tasks (no public IP is assigned); they need a route to MongoDB and to the AWS APIs (NAT or VPC endpoints)."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "subnet_ids: at least one subnet."
  }
}

variable "config_yaml" {
  description = <<-EOT
    The mongo-watcher config file (YAML; see the README's configuration reference). It is
    passed to the init container in an environment variable, so it is visible in the task
    definition: keep secrets out of it and use `password_ssm_parameter` /
    `http.api_token_ssm_parameter`, or `$${VAR}` with `secret_environment`. `http.listen` must
    stay on port 8080 (the default 0.0.0.0:8080) and `checkpoints.table` should name
    `checkpoint_table_name`.
  EOT
  type        = string

  validation {
    condition     = can(yamldecode(var.config_yaml)) && can(yamldecode(var.config_yaml).watchers[0])
    error_message = "config_yaml: must be YAML with at least one entry under `watchers`."
  }
}

variable "kinesis_stream_arns" {
  description = "ARNs of the Kinesis streams the watchers write to (the task role may PutRecords to these only)."
  type        = list(string)

  validation {
    condition     = length(var.kinesis_stream_arns) > 0 && alltrue([for arn in var.kinesis_stream_arns : can(regex("^arn:aws[a-z-]*:kinesis:", arn))])
    error_message = "kinesis_stream_arns: at least one Kinesis stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)."
  }
}

variable "checkpoint_table_name" {
  description = "Name of the DynamoDB checkpoint table created here (migrations/checkpoints.json)."
  type        = string
  default     = "mongo-watcher-checkpoints"
}

variable "checkpoint_table_kms_key_arn" {
  description = "Customer managed KMS key for the checkpoint table; null uses the AWS managed key aws/dynamodb."
  type        = string
  default     = null
}

variable "ssm_parameter_arns" {
  description = "SSM parameters the process reads itself (mongodb.password_ssm_parameter, http.api_token_ssm_parameter): the task role gets ssm:GetParameter on these."
  type        = list(string)
  default     = []
}

variable "kms_key_arns" {
  description = "KMS keys of the SecureString parameters in ssm_parameter_arns and secret_environment (kms:Decrypt through SSM only). Empty when they use the AWS managed key aws/ssm."
  type        = list(string)
  default     = []
}

variable "claim_check_bucket" {
  description = "Bucket of `on_oversized: s3` (the watchers' `s3.bucket`): the task role gets s3:PutObject on its objects under claim_check_prefix. Null (no watcher claim-checks) grants nothing."
  type        = string
  default     = null
}

variable "claim_check_prefix" {
  description = "The watchers' `s3.prefix` in claim_check_bucket (objects are written as <prefix><watcher>/<sha256>.json); empty grants the whole bucket."
  type        = string
  default     = ""
}

variable "secret_environment" {
  description = "Environment variables injected by ECS from SSM parameters: name => parameter ARN, e.g. { MONGO_WATCHER_API_TOKEN = arn..., MONGO_PASSWORD = arn... } (the execution role reads them)."
  type        = map(string)
  default     = {}
}

variable "environment" {
  description = "Extra plain environment variables of the mongo-watcher container, e.g. { LOG_LEVEL = \"debug\" }."
  type        = map(string)
  default     = {}
}

variable "desired_count" {
  description = "Number of tasks. Without leases 1 (or 0 to stop): watchers are not sharded across tasks, and two tasks would conflict on the same checkpoints. With leases_enabled any number (2 or more for failover): each watcher runs on one task at a time."
  type        = number
  default     = 1

  validation {
    condition     = var.desired_count >= 0 && floor(var.desired_count) == var.desired_count && (var.leases_enabled || var.desired_count <= 1)
    error_message = "desired_count: 0 or 1 without leases_enabled (watchers are not sharded across tasks, and two tasks would conflict on the same checkpoints); any whole number >= 0 with leases_enabled."
  }
}

variable "leases_enabled" {
  description = "Several tasks share the watchers through a lease table (the config's `leases: {table, ttl}`): creates the lease table, grants the task role on it and deploys rolling (minimum 100 % healthy, maximum 200 %). config_yaml must then have `leases.table` = lease_table_name."
  type        = bool
  default     = false

  validation {
    condition     = var.leases_enabled == can(yamldecode(var.config_yaml).leases.table)
    error_message = "leases_enabled must be true exactly when config_yaml has `leases.table` (naming lease_table_name): the task role needs the lease table, and without leases two tasks would conflict."
  }
}

variable "lease_table_name" {
  description = "Name of the DynamoDB lease table created when leases_enabled (migrations/leases.json); the config's leases.table."
  type        = string
  default     = "mongo-watcher-leases"
}

variable "lease_table_kms_key_arn" {
  description = "Customer managed KMS key for the lease table; null uses the AWS managed key aws/dynamodb."
  type        = string
  default     = null
}

variable "cpu" {
  description = "Task CPU units."
  type        = number
  default     = 256
}

variable "memory" {
  description = "Task memory (MiB)."
  type        = number
  default     = 512
}

variable "cpu_architecture" {
  description = "X86_64 or ARM64, matching the image."
  type        = string
  default     = "X86_64"
}

variable "platform_version" {
  description = "Fargate platform version."
  type        = string
  default     = "LATEST"
}

variable "log_retention_days" {
  description = "Retention of the CloudWatch log group."
  type        = number
  default     = 365
}

variable "log_kms_key_arn" {
  description = "KMS key for the log group; null uses CloudWatch Logs' own encryption. The key policy must allow logs.REGION.amazonaws.com."
  type        = string
  default     = null
}

variable "mongodb_cidr_blocks" {
  description = "CIDR blocks of the MongoDB members the tasks connect to."
  type        = list(string)
}

variable "mongodb_port" {
  description = "MongoDB port."
  type        = number
  default     = 27017
}

variable "create_alb" {
  description = "Create an internal ALB with an HTTPS listener in front of the control plane. When false, attach the target_group_arn output to an existing listener and set alb_security_group_id."
  type        = bool
  default     = true
}

variable "alb_security_group_id" {
  description = "Security group of an existing ALB (only with create_alb = false): the tasks accept port 8080 from it."
  type        = string
  default     = null
}

variable "alb_subnet_ids" {
  description = "Subnets of the internal ALB; empty uses subnet_ids."
  type        = list(string)
  default     = []
}

variable "alb_ingress_cidr_blocks" {
  description = "Who may reach the ALB's HTTPS listener (operators, Prometheus), e.g. the VPC CIDR."
  type        = list(string)
  default     = []
}

variable "alb_certificate_arn" {
  description = "ACM certificate of the HTTPS listener (required with create_alb)."
  type        = string
  default     = null
}

variable "alb_ssl_policy" {
  description = "TLS policy of the HTTPS listener."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-2021-06"
}

variable "alb_access_logs_bucket" {
  description = "S3 bucket for the ALB's access logs; null disables them."
  type        = string
  default     = null
}

variable "alb_deletion_protection" {
  description = "Deletion protection of the ALB."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
  default     = {}
}
