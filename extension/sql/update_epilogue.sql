-- The last part of every update script: the attachment as this version makes it (views, grants on
-- the application's columns, triggers), when there is one.
do $epilogue$
declare
    a  booking_guard.attached_tables;
begin
    select * into a from booking_guard.attached_tables;
    if found then
        perform booking_guard_internal.create_guarded_views(a.calls_table, a.appointments_table);
        perform booking_guard_internal.grant_columns(a.calls_table, a.appointments_table, true);
        perform booking_guard_internal.install_triggers(a.calls_table, a.appointments_table);
    end if;
end
$epilogue$;
