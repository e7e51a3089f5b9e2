# Two mongo-watcher tasks sharing the watchers through the lease table: each watcher runs on
# one task at a time, and when a task stops (a deployment, a lost host) the other takes its
# watchers (within a ttl and a third after a kill, at its next tick after a SIGTERM).
#
# Create or check the tables' schema afterwards with the same config (idempotent):
#   mongo-watcher migrate --config config.yaml

terraform {
  required_version = ">= 1.9.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0, < 7.0"
    }
  }
}

provider "aws" {
  region = "eu-west-1"
}

module "mongo_watcher" {
  source = "../.."

  image           = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mongo-watcher:0.1.0"
  ecs_cluster_arn = "arn:aws:ecs:eu-west-1:123456789012:cluster/streams"
  vpc_id          = "vpc-0123456789abcdef0"
  subnet_ids      = ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]

  # Two tasks, deployed rolling (minimum 100 % healthy, maximum 200 %).
  leases_enabled   = true
  desired_count    = 2
  lease_table_name = "mongo-watcher-leases"

  checkpoint_table_kms_key_arn = "arn:aws:kms:eu-west-1:123456789012:key/11111111-1111-1111-1111-111111111111"
  lease_table_kms_key_arn      = "arn:aws:kms:eu-west-1:123456789012:key/11111111-1111-1111-1111-111111111111"
  log_kms_key_arn              = "arn:aws:kms:eu-west-1:123456789012:key/22222222-2222-2222-2222-222222222222"

  mongodb_cidr_blocks     = ["10.20.0.0/24"]
  alb_ingress_cidr_blocks = ["10.0.0.0/8"]
  alb_certificate_arn     = "arn:aws:acm:eu-west-1:123456789012:certificate/00000000-0000-0000-0000-000000000000"
  alb_access_logs_bucket  = "streams-alb-logs"

  kinesis_stream_arns = [
    "arn:aws:kinesis:eu-west-1:123456789012:stream/orders-events",
    "arn:aws:kinesis:eu-west-1:123456789012:stream/users-events",
  ]
  ssm_parameter_arns = [
    "arn:aws:ssm:eu-west-1:123456789012:parameter/prod/mongo/password",
  ]
  secret_environment = {
    MONGO_WATCHER_API_TOKEN = "arn:aws:ssm:eu-west-1:123456789012:parameter/prod/mongo-watcher/api-token"
  }

  config_yaml = <<-EOT
  mongodb:
    uri: "mongodb://db-1:27017,db-2:27017/?replicaSet=rs0"
    username: app
    password_ssm_parameter: /prod/mongo/password
  checkpoints:
    table: mongo-watcher-checkpoints
  leases:
    table: mongo-watcher-leases
    ttl: 15s
  watchers:
    - name: orders
      database: shop
      collection: orders
      stream: orders-events
    - name: users
      database: shop
      collection: users
      stream: users-events
      partition_key: fullDocument.email
  EOT
}

output "lease_table_name" {
  value = module.mongo_watcher.lease_table_name
}

output "alb_dns_name" {
  value = module.mongo_watcher.alb_dns_name
}
